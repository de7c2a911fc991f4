"""Post-training weight quantization: round-to-nearest, NF4 and the calibrated methods AWQ and GPTQ."""
