-- A Byzer/MLSQL script, unchanged in shape: a model table registered with registerCode,
-- Spark SQL selects. Run `make demo` first (it writes the model table and the digits), then
--   rayudf run examples/byzer_register_ray.sql
set model_table = "demo_data/models/digits_table";
set data = "demo_data/data/digits.parquet";
set workers = "2";

!python conf "runIn=driver";
set sql.dialect="spark";
load parquet.`${model_table}` as clf_model;
register Ray.`clf_model` as clf_predict where maxConcurrency="${workers}" and registerCode='''
import numpy as np
from pyjava.api.mlsql import RayContext
from pyjava.udf import UDFBuilder, UDFBuildInFunc
ray_context = RayContext.connect(globals(), context.conf.get("rayAddress"))
def predict_func(model, v):
    x = np.array([v]).reshape((1, 64))
    return {"value": [[float(np.argmax(p)) for p in model.predict(x, verbose=0)]]}
UDFBuilder.build(ray_context, UDFBuildInFunc.init_tf, predict_func)
''';
load parquet.`${data}` as digits;
select id, label, cast(pixels as array<double>) as pixels from digits limit 100 as sample;
select id, label, clf_predict(array(pixels)) as predicted from sample as output;
