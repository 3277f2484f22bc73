"""kws_utils: the shared code of the keyword-spotting course, one module per stage."""
