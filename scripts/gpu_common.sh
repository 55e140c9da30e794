# Sourced by the GPU scripts: a work directory removed at exit, everything
# also logged to $OUT/$1.log (or the work directory), and the wheels in
# .whl/ (if any) installed to /tmp/site first.
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=${OUT:+$OUT/$1.log}
LOG=${LOG:-$WORK/log}
exec > >(tee "$LOG") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
