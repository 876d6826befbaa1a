"""Inference backends behind one interface (base.Backend): ONNX Runtime on the CPU or CUDA, TensorRT.
`pairs.build_pair` turns a prepared model into a running dense + twin pair on the backend `auto` finds.
"""
