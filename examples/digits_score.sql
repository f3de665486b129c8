-- Score scikit-learn's digits with the Keras model that `make demo` trains.
--   rayudf run examples/digits_score.sql
--   rayudf run examples/digits_score.sql --set data=my/*.parquet --set model=my.keras --set workers=1
-- Values given with --set win over the defaults set here.
set data = "demo_data/data/digits.parquet";
set model = "demo_data/models/digits.keras";
set out = "out/digits_scored.parquet";
set workers = "2";

load parquet.`${data}` as digits;
register keras.`${model}` as digit_predict where workers="${workers}" and batch_size="256";

select id, label, digit_predict(pixels) as probs from digits as scored;
select id, label, list_position(probs::FLOAT[], list_max(probs::FLOAT[])) - 1 as predicted
  from scored as labelled;
save overwrite labelled as parquet.`${out}`;

select count(*) as rows, avg((predicted = label)::INT) as accuracy
  from read_parquet('${out}') as output;
