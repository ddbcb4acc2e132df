# Sourced by the device scripts: Python, $OUT, the carried wheels and this checkout's src/ on the path.
python=${PYTHON:-python3}
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site SKIP_WHEELS=1  # once per call: scripts it starts skip this
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
