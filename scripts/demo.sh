#!/usr/bin/env bash
# The main job end to end on the embedded default (local Ray, local files):
# train a bundle, predict one photo, label a folder of photos into Parquet, read it back.
# With ../shared present it uses the real Stanford Dogs photos and ImageNet MobileNetV2 weights:
# the `demo` preset trains a head on frozen features of the first 12 photos of each of the 120
# breeds (about 3 minutes end to end on 2 cores; the full recipe is `--preset mobilenet_v2`);
# without ../shared, a synthetic set and a tiny CNN. Each step prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SHARED=${BREEDLABEL_SHARED:-$(cd .. && pwd)/shared}
DEMO=${DEMO:-runs/demo}
WEIGHTS="$SHARED/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

rm -rf "$DEMO/bundle" "$DEMO/bundle.run"
mkdir -p "$DEMO"
if [ -d "$SHARED/data/stanford_dogs_train" ] && [ -f "$WEIGHTS" ]; then
  DATA="$SHARED/data/stanford_dogs_train"
  PHOTOS="$SHARED/data/sample_bucket"
  TRAIN=(--preset demo --weights "$WEIGHTS")
else
  echo "demo: $SHARED/data is absent, using a synthetic 4-breed data set and a tiny CNN"
  DATA="$DEMO/synthetic"
  PHOTOS="$DEMO/synthetic"
  "$BIN/python" -c "from tests.fixtures.images import make_synthetic_dataset as m; m('$DATA', 4, 24)"
  TRAIN=(--preset smoke --epochs 20 --finetune-epochs 3)
fi

START=$SECONDS
step_start() { echo "== $1"; STEP=$SECONDS; }
step_done() { echo "   ($((SECONDS - STEP)) s)"; }

step_start "1/4 train -> $DEMO/bundle"
"$BIN/breedlabel" train --data "$DATA" --out "$DEMO/bundle" "${TRAIN[@]}"
step_done

step_start "2/4 predict one photo"
PHOTO=$(find "$PHOTOS" -type f | sort | sed -n 1p)  # sed reads to the end: no SIGPIPE under pipefail
"$BIN/breedlabel" predict "$PHOTO" --model "$DEMO/bundle"
step_done

step_start "3/4 label $PHOTOS -> $DEMO/labels (Ray Data, local Ray)"
"$BIN/breedlabel" label "$PHOTOS" --model "$DEMO/bundle" --out "$DEMO/labels" --incremental
step_done

step_start "4/4 read the finished runs back (DuckDB): this bundle's rows, top-1 against the folder name"
# one row per photo and model: a rerun with a retrained bundle (a new model_id) adds its own rows beside
# the earlier bundle's, so the read keeps to this bundle's
"$BIN/python" - "$DEMO/labels" "$DEMO/bundle/card.json" <<'PY'
import json, sys, duckdb
out, card = sys.argv[1], sys.argv[2]
model_id = json.load(open(card))["model_id"]
con = duckdb.connect()
q = f"""
SELECT count(*) AS images,
       count(*) FILTER (WHERE error IS NOT NULL) AS errors,
       count(*) FILTER (WHERE NOT is_dog) AS no_dog_found,
       round(avg(CASE WHEN split_part(split_part(uri, '/', -2), '-', 1) = top_k[1].breed_id
                 THEN 1.0 ELSE 0.0 END) * 100, 1) AS top1_vs_folder_pct
FROM read_parquet('{out}/run_id=*/*.parquet', hive_partitioning = true)
WHERE model_id = ?
"""
print(con.sql(q, params=[model_id]))
PY
step_done
echo "demo: $((SECONDS - START)) s in all"
