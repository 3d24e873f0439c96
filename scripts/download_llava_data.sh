#!/usr/bin/env bash
# Fetch the LLaVA-1.5 training data into the layout XTuner's and vlmtune's LLaVA configs use:
#
#   ROOT/LLaVA-Pretrain/{blip_laion_cc_sbu_558k.json, blip_laion_cc_sbu_558k_meta.json, images/}
#   ROOT/LLaVA-Instruct-150K/llava_v1_5_mix665k.json
#   ROOT/llava_images/{coco/train2017, gqa/images, textvqa/train_images, vg/VG_100K, vg/VG_100K_2}
#   ROOT/llava_images/ocr_vqa/images      <- by hand; this script prints how
#
# Usage:  scripts/download_llava_data.sh [ROOT]        (ROOT defaults to ./data/llava_data)
#         KEEP_ZIPS=1 scripts/download_llava_data.sh   keep the archives after unpacking
# Needs git, git-lfs, wget, unzip; about 60 GB of downloads and twice that free while unpacking.
# Resumable: an interrupted download continues (wget -c, git lfs pull), and each finished part leaves a
# marker in ROOT/.download, so running the script again only does what is left.
# Afterwards: vlmtune data prepare ROOT, then vlmtune data check (see docs/data.md).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

ROOT=${1:-./data/llava_data}
KEEP_ZIPS=${KEEP_ZIPS:-0}
STATE="$ROOT/.download"
IMAGES="$ROOT/llava_images"

need() {  # need COMMAND HINT
  command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required: $2" >&2; exit 1; }
}

marker() { echo "$STATE/$1.done"; }

hf_dataset() {  # hf_dataset FOLDER REPO FILE...: clone without LFS content, then pull only FILEs
  local folder=$1 repo=$2
  shift 2
  local dir="$ROOT/$folder"
  if [[ -f "$(marker "$folder")" ]]; then
    echo "skip $folder: already downloaded"
    return
  fi
  if [[ ! -d "$dir/.git" ]]; then
    GIT_LFS_SKIP_SMUDGE=1 git clone "https://huggingface.co/datasets/$repo" "$dir"
  fi
  local include
  include=$(IFS=,; echo "$*")
  git -C "$dir" lfs pull --include "$include"
  touch "$(marker "$folder")"
}

fetch_zip() {  # fetch_zip NAME URL DEST EXPECTED: download NAME.zip, unpack into DEST, check DEST/EXPECTED
  local name=$1 url=$2 dest=$3 expected=$4
  local zip="$STATE/$name.zip"
  if [[ -f "$(marker "$name")" ]]; then
    echo "skip $name: already unpacked"
    return
  fi
  echo "== $name: $url"
  wget -c --progress=dot:giga -O "$zip" "$url"
  mkdir -p "$dest"
  unzip -q -n "$zip" -d "$dest"  # -n: files already unpacked by an interrupted run are kept
  if [[ ! -d "$dest/$expected" ]]; then
    echo "error: $zip did not unpack to $dest/$expected" >&2
    exit 1
  fi
  touch "$(marker "$name")"
  if [[ "$KEEP_ZIPS" != 1 ]]; then
    rm -f "$zip"
  fi
}

need git "https://git-scm.com"
need git-lfs "https://git-lfs.com (then: git lfs install)"
need wget "apt-get install wget"
need unzip "apt-get install unzip"
mkdir -p "$STATE" "$IMAGES"

# LLaVA-Pretrain: 558K LAION/CC/SBU captions and their images (images.zip is unpacked into images/)
hf_dataset LLaVA-Pretrain liuhaotian/LLaVA-Pretrain \
  blip_laion_cc_sbu_558k.json blip_laion_cc_sbu_558k_meta.json images.zip
if [[ ! -f "$(marker pretrain_images)" ]]; then
  mkdir -p "$ROOT/LLaVA-Pretrain/images"
  unzip -q -n "$ROOT/LLaVA-Pretrain/images.zip" -d "$ROOT/LLaVA-Pretrain/images"
  touch "$(marker pretrain_images)"
fi

# LLaVA-Instruct-150K: only the LLaVA-1.5 665K mix is needed
hf_dataset LLaVA-Instruct-150K liuhaotian/LLaVA-Instruct-150K llava_v1_5_mix665k.json

# The images the 665K mix refers to
fetch_zip coco_train2017 http://images.cocodataset.org/zips/train2017.zip "$IMAGES/coco" train2017
fetch_zip gqa_images https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip "$IMAGES/gqa" images
fetch_zip textvqa_train_val https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip "$IMAGES/textvqa" train_images
fetch_zip vg_part1 https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip "$IMAGES/vg" VG_100K
fetch_zip vg_part2 https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip "$IMAGES/vg" VG_100K_2

mkdir -p "$IMAGES/ocr_vqa/images"
cat <<EOF

Done, except OCR-VQA, which has no archive to download (its covers come from their original URLs):
  1. From https://ocr-vqa.github.io/ download dataset.json and loadDataset.py (the Google Drive folder
     linked there).
  2. In loadDataset.py set download = 1, then run it from $IMAGES/ocr_vqa
     (it writes the covers into images/, each with the extension of its URL: .jpg, .gif, .png).
  3. vlmtune data prepare $ROOT
     checks this layout and turns every cover into a real JPEG named <id>.jpg, as llava_v1_5_mix665k.json
     expects (use --dry-run first to see what it would change).
  4. vlmtune data check $ROOT/LLaVA-Instruct-150K/llava_v1_5_mix665k.json --image-folder $IMAGES --config <your config>
EOF
