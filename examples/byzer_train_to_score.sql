-- A Byzer script from training to scoring, unchanged in shape: Byzer-python trains a Keras
-- model on Ray, the model directory becomes a table of tar chunks saved to the Delta lake,
-- is loaded back, registered with registerCode, and scores the images it was trained on.
-- Run `make demo` first (it writes demo_data/data/mnist), then
--   rayudf run examples/byzer_train_to_score.sql
set mnist = "demo_data/data/mnist";
set lake.root = "demo_data/lake";

!python env "PYTHON_ENV=:";
!python conf "schema=file";
!python conf "runIn=driver";
!python conf "dataMode=model";
load parquet.`${mnist}` as mnist_data;

run command as Ray.`` where inputTable="mnist_data" and outputTable="mnist_model" and code='''
import ray, os, tempfile
from tensorflow.keras import models, layers
from tensorflow.keras import utils as np_utils
from pyjava.api.mlsql import RayContext
from pyjava.storage import streaming_tar
from pyjava import rayfix
import numpy as np

ray_context = RayContext.connect(globals(), context.conf.get("rayAddress"))
data_servers = ray_context.data_servers()

def data():
    rows = [item for item in RayContext.collect_from(data_servers)]
    x = np.array([np.array(r["image"]) for r in rows]).reshape((len(rows), 28*28))
    return x, np_utils.to_categorical(np.array([r["label"] for r in rows]))

@ray.remote
@rayfix.last
def train():
    x, y = data()
    np_utils.set_random_seed(0)  # the same weights and batches in every run
    network = models.Sequential()
    network.add(layers.Dense(512, activation="relu", input_shape=(28*28,)))
    network.add(layers.Dense(10, activation="softmax"))
    network.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    network.fit(x, y, epochs=6, batch_size=128)
    model_path = os.path.join(tempfile.mkdtemp(), "minist_model")
    network.export(model_path)            # Keras 3's SavedModel directory
    return [item for item in streaming_tar.build_rows_from_file(model_path)]

ray_context.build_result(ray.get(train.remote()))
''';
save overwrite mnist_model as delta.`ai_model.mnist_model`;

load delta.`ai_model.mnist_model` as mnist_model;
register Ray.`mnist_model` as model_predict where maxConcurrency="2" and registerCode='''
import ray
import numpy as np
from pyjava.api.mlsql import RayContext
from pyjava.udf import UDFMaster, UDFWorker, UDFBuilder, UDFBuildInFunc

ray_context = RayContext.connect(globals(), context.conf.get("rayAddress"))

def predict_func(model, v):
    test_images = np.array([v])
    predictions = model.predict(test_images.reshape((1, 28*28)))
    return {"value": [[float(np.argmax(item)) for item in predictions]]}

UDFBuilder.build(ray_context, UDFBuildInFunc.init_tf, predict_func)
''';
set sql.dialect = "spark";
select cast(image as array<double>) as image, label from mnist_data limit 100 as new_mnist_data;
select model_predict(array(image)) as predicted, label from new_mnist_data as output;
