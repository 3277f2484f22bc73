"""Quantization for the TI NPU: QAT/PTQ wrappers with the API of TI's ``tinyml_torchmodelopt``.

The course carries this small implementation of TI's ``tinyml_torchmodelopt.quantization``
(github.com/TexasInstruments/tinyml-tensorlab) with the same class names and arguments. A
learner's code runs against either by changing one import (see ``quant_backend()`` and
``KWS_QUANT_BACKEND=ti``).

Modules, by concern (``kws_utils.export`` never imports this package, so there is no circle):
    qconfig    qconfig_type dicts: defaults, validation, normalization
    observers  observers and fake quantization (torch QConfig, backend config)
    onnx_form  ONNX writers for an IntegerModel (TI NPU integer form, QDQ form)
    onnx_read  read a TINPU integer ONNX file (TI's or the course's) into an IntegerModel
    agreement  side-by-side runs against TI's package (benchmarks, tests)
    integer    IntLayer, IntegerModel, build_integer_model, requantization constants
    wrappers   TINPUTinyML*FxModule, TinyMLModelQConfigFormat, quant_backend()
    gap        the NPU's pool in the fake-quant model (match_npu_pool); fake-quant vs integer per layer
    requant    the NPU's requantization in the fake-quant model (integer bias, 8-bit multipliers); bias tuning
    course     helpers of notebooks 04-06 (ptq, qat, quantize_variant, ...)

Workflow (both QAT and PTQ)::

    qmodel = TINPUTinyMLQATFxModule(model, total_epochs=4, qconfig_type=qconfig_for(8),
                                    example_inputs=torch.zeros(1, 1, 49, 10))
    for epoch in range(4):
        qmodel.train()            # one call per epoch: drives the freezing schedule
        ...usual training loop on qmodel...
        qmodel.eval()
    int_model = qmodel.convert()  # IntegerModel: integer weights, int requantization
    int_model.export(example, "kws_int8.onnx", input_names=["input"])

PTQ calibration needs no training: wrap with ``TINPUTinyMLPTQFxModule(model, total_epochs=1)``,
run forward passes over a few hundred representative inputs under ``torch.no_grad()`` (the
observers record ranges; BatchNorm uses its running statistics), ``eval()``, then ``convert()``.
TI's KWS example calibrates in ``train()`` mode (Dropout active); ``eval()`` mode also works.

Schedule over ``total_epochs`` (TI's rule and meaning): epochs are counted by ``train()`` calls.
QAT BatchNorm statistics freeze from epoch ``num_batch_norm_update_epochs`` on, observer ranges
from epoch ``num_observer_update_epochs`` on; None or 0 means TI's default
(``total_epochs // 2 - 1`` and ``total_epochs // 2 + 1``), False never freezes. PTQ keeps
BatchNorm frozen throughout. ``convert()`` freezes everything.

The course's own departures from TI are wrapper options, all off by default:
``freeze_bn_from_start`` (BatchNorm frozen from the first QAT epoch), ``share_dropout_observer``
(Dropout/Flatten keep their input's scale in the fake-quant model), ``exact_pool`` (an 8-bit
pooling divisor also with power-of-2 scales), and the weight observers ``'mse'`` and
``'current_minmax'`` (ranges from the current weights instead of TI's running min/max).
``match_integer_model(wrapper)`` (either backend) makes the fake-quant model compute what the
integer model computes: the pool's 1-bit ``1/64`` for 125 positions and no re-rounding after
Dropout/Flatten; ``match_requantization(wrapper)`` adds the NPU's requantization (the bias and half step in
whole accumulator units, the 8-bit ``mult``), after which the convolutions give the integer model's outputs;
``tune_biases`` trains the biases through it (learned rounding's last stage); ``layer_gap`` measures what
is left, layer by layer, and ``prediction_flips`` counts the clips whose class it
changes.

Numbers (TI's): weights are symmetric, ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int8 [-127, 127],
int4 [-7, 7], int2 ternary [-1, 1]) with one scale per output channel; activations 8-bit,
unsigned [0, 255] after ReLU and signed [-128, 127] otherwise. Each Conv/Linear requantizes
its int32 accumulator with ``clamp(floor((acc + offset) * mult * 2**-shift), qmin, qmax)``;
``mult`` has 1 bit with power-of-2 scales, else 8 bits. See ``integer`` for the details.
"""
import warnings

# torch marks the quantized-tensor constructors that TI's convert() calls as deprecated (torchao is
# to replace them); requirements.txt pins torch, so the notice gives a learner nothing to act on.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)

from kws_utils.quant.qconfig import (FLOAT32_EXACT, MAX_SHIFT, MULT_BITS, WEIGHT_BITS,
                                     default_qconfig_type, layer_qconfig_type,
                                     normalize_qconfig_type, output_int_dtype, qconfig_for,
                                     ti_example_qconfig, with_affine_activations)
from kws_utils.quant.observers import (MSE_RATIOS, ActivationObserver, PerChannelWeightObserver,
                                       PerTensorWeightObserver, ceil_power2, make_backend_config,
                                       make_qconfig)
from kws_utils.quant.onnx_form import export_integer_onnx, export_qdq_onnx
from kws_utils.quant.integer import (InputStage, IntegerModel, IntLayer, build_integer_model,
                                     requant_params, run_layer)
from kws_utils.quant.onnx_read import read_integer_onnx
from kws_utils.quant.gap import (GAP_HEADERS, Flips, LayerGap, NpuPoolGain, PassThrough, gap_table,
                                 layer_gap, match_integer_model, match_npu_pool, pool_gain,
                                 prediction_flips, skip_pass_through_quantizers, top2_margin)
from kws_utils.quant.wrappers import (TINPUTinyMLPTQFxModule, TINPUTinyMLQATFxModule,
                                      TINPUTinyMLQuantFxModule, TinyMLModelQConfigFormat,
                                      quant_backend, ti_installed)
from kws_utils.quant.course import (QUANT_METHODS, VariantResult, accuracy, calibrate,
                                    calibration_subset, export_integer, fake_quantize_weight,
                                    fold_batchnorm, integer_module, is_ti, onnx_check,
                                    packed_weight_bytes, ptq, qat, qat_fit, quantize_variant,
                                    schedule_state, stable_conv_bn, variant_onnx_path)
from kws_utils.quant.requant import match_requantization, plain_layers, requant_terms, tune_biases
from kws_utils.quant.rounding import LayerRounding, layer_errors, learn_rounding, ptq_learned
