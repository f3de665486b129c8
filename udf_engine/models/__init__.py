"""Models as files and rows: the model store and its chunks, Byzer's tar chunks, where a model
comes from (files, MLflow, tables), and the loaders a worker runs (Keras, pickle, ONNX, boosters, MLflow)."""
