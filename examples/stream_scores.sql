-- Score digits files as they arrive in a directory, with the Keras model `make demo` trains,
-- until Ctrl-C or SIGTERM (which let the batch in progress commit):
--   rayudf run examples/stream_scores.sql
-- From another shell, drop Parquet files of (id, pixels) rows in whole, by rename
-- (names starting with . or _ are not read, so copy to one first):
--   mkdir -p out/incoming && cp demo_data/data/digits.parquet out/incoming/.part && mv out/incoming/.part out/incoming/digits-1.parquet
-- and read what the stream wrote (one part file per micro-batch):
--   python -c "import duckdb; print(duckdb.sql(\"select predicted, count(*) from 'out/stream_scored/*.parquet' group by 1\"))"
-- A restart with the same checkpoint goes on where the stream stopped: each file's rows land once.
set streamName = "digit_scores";
set incoming = "out/incoming";
set scored = "out/stream_scored";
set checkpoint = "out/stream_checkpoint";
set model = "demo_data/models/digits.keras";
set workers = "2";

register keras.`${model}` as digit_predict where workers="${workers}" and batch_size="256";
load parquet.`${incoming}` as digits;

select id, digit_predict(pixels) as probs from digits as scored;
select id, list_position(probs::FLOAT[], list_max(probs::FLOAT[])) - 1 as predicted, probs
  from scored as labelled;
save append labelled as parquet.`${scored}` options duration="1" and checkpointLocation="${checkpoint}";
