"""Offline side: data sets, training of every model, ONNX export with parity checks, bundle writing."""
