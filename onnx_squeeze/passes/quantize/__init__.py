"""What the quantization passes share (each pass is a module beside this package, named after
it: ``quantize_int8``, ``quantize_dynamic``, ``fp16``, ``fp8``, ``quantize_weights``,
``codebook``).

- :mod:`.params`: scales, zero points, weight quantization and calibration methods (numpy).
- :mod:`.eligibility`: which nodes and tensors may be quantized, and the node selection.
- :mod:`.plan`: where Q/DQ pairs go and which tensors share parameters.
- :mod:`.qdq`: the one writer of QuantizeLinear/DequantizeLinear pairs and quantized weights.
- :mod:`.statistics` and :mod:`.settling`: calibration statistics, read until ranges settle.
- :mod:`.bias_correction`, :mod:`.accuracy_control`, :mod:`.speed_check`: what static INT8 adds.
- :mod:`.shared_weights` and :mod:`.weight_codecs`: weight-only encodings.
"""
