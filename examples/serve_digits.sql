-- The digits model answering HTTP. Run `make demo` first (it writes demo_data/), then
--   rayudf serve examples/serve_digits.sql
-- and ask it from another shell (a row is 64 pixel values, 0..1; docs/serving.md has the rest):
--   curl -s localhost:8000/model/predict -d "data=[[$(python3 -c 'print(",".join(["0.5"] * 64))')]]" -d "sql=select digit_predict(feature) as probs"
set model = "demo_data/models/digits.keras";
register keras.`${model}` as digit_predict where workers="2";
