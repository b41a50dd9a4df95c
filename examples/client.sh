#!/usr/bin/env bash
# Classify images with a running `classifier serve`: examples/client.sh a.jpg b.png (URL=http://host:port to change)
set -euo pipefail
URL=${URL:-http://127.0.0.1:8000}
args=()
for image in "$@"; do args+=(-F "files=@${image}"); done
curl --silent --show-error "${args[@]}" "$URL/predict"
echo
# one image as the raw body:  curl --data-binary @a.jpg "$URL/predict"
# the model:                  curl "$URL/info"
