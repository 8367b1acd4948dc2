#!/usr/bin/env bash
# The worker image, built for real with podman on a machine without a registry or a Docker daemon.
#
#   deploy/image.sh base    localhost/atric-base: Debian bookworm made by debootstrap (kept once built)
#   deploy/image.sh build   base + the worker image localhost/atric-worker from ./Dockerfile
#   deploy/image.sh smoke   build, then inside the image: tune.py --help, import atric, and a
#                           1-trial tune on a tiny corpus against the local stack (deploy/stack.sh)
#   deploy/image.sh check   the smoke checks alone, on the image already built
#   deploy/image.sh size    the worker image's size in bytes
#
# Env: ATRIC_IMAGE (default localhost/atric-worker), ATRIC_BASE_IMAGE (default localhost/atric-base),
# ATRIC_DEBIAN_MIRROR (default: the mirror of this machine's apt sources), ATRIC_REBUILD_BASE=1,
# ATRIC_NO_CACHE=1 (build the worker image without podman's layer cache: the cold cost).
# Elsewhere (a registry, a GPU): docker build --build-arg BASE=nvidia/cuda:... (see Dockerfile).
#
# Why these flags: `podman run` is refused on this kind of sandbox (cgroups v1 hybrid, rlimits),
# but `podman build --isolation chroot` runs RUN steps and `buildah run --isolation chroot` runs a
# command in a container of the image: the smoke checks use the latter. The build sees the pip
# configuration, wheel folder and file indexes of this machine (bind mounts, read-only) and the
# package registries (network host), so it resolves exactly what `make venv` resolves here.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${ATRIC_IMAGE:-localhost/atric-worker}"
BASE_IMAGE="${ATRIC_BASE_IMAGE:-localhost/atric-base}"
export BUILDAH_ISOLATION=chroot

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
say() { printf '== %s\n' "$*"; }

need() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "error: ${missing[*]} not found: apt-get install podman debootstrap" >&2
        exit 2
    fi
}

debian_mirror() {
    if [ -n "${ATRIC_DEBIAN_MIRROR:-}" ]; then echo "$ATRIC_DEBIAN_MIRROR"; return; fi
    local found=""
    # deb822 (.sources): the URIs of the stanza whose Suites name plain bookworm.
    found=$(awk '/^URIs:/ {u=$2} /^Suites:/ {for (i=2; i<=NF; i++) if ($i=="bookworm") {print u; exit}}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
    if [ -z "$found" ] && [ -f /etc/apt/sources.list ]; then
        found=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${found:-http://deb.debian.org/debian}"
}

build_base() {
    if [ "${ATRIC_REBUILD_BASE:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
        say "base $BASE_IMAGE present (ATRIC_REBUILD_BASE=1 rebuilds it)"
        return
    fi
    local mirror root started
    mirror=$(debian_mirror)
    root=$(mktemp -d /var/tmp/atric-base.XXXXXX)
    trap 'rm -rf "$root"; trap - RETURN' RETURN  # this call's return only
    started=$SECONDS
    say "debootstrap bookworm from $mirror (a few minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
    rm -f "$root.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    say "podman import -> $BASE_IMAGE"
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    say "base built in $((SECONDS - started)) s"
}

# pip as this machine has it: its effective config (find-links, extra indexes, constraints,
# certificates), written to one pip.conf the build mounts at /etc/pip.conf.
pip_mounts() {
    local conf="$1" python="${PYTHON:-python3}"
    local mounts=("-v" "$conf:/etc/pip.conf:ro")
    local frozen=""
    if [ -x .venv/bin/python ]; then
        frozen="$(dirname "$conf")/venv-constraints.txt"
        .venv/bin/python -m pip freeze --exclude-editable | grep -vE '^(-e |atric[= ])|@ ' >"$frozen"
    fi
    mapfile -t -O 2 mounts < <("$python" - "$conf" "$frozen" <<'EOF'
import configparser, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
cfg = configparser.ConfigParser()
cfg["global"] = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.split(".", 1)[-1]
    if name in ("no-cache-dir", "disable-pip-version-check", "user") or name in cfg["global"]:
        continue  # the Dockerfile sets its own
    value = value.strip().strip("'\"")
    if name == "cert":
        # This machine's CA bundle: a proxy may sign the registry's certificates.
        print(f"-v\n{value}:/run/host-ca.crt:ro")
        value = "/run/host-ca.crt"
    cfg["global"][name] = value
# The versions of this checkout's tested venv (.venv), as constraints: the image resolves
# exactly those, without resolver backtracking (minutes on dvc/aiobotocore otherwise).
frozen = sys.argv[2]
if frozen:
    cfg["global"]["constraint"] = " ".join(filter(None, [cfg["global"].get("constraint", ""), frozen]))
    print(f"-v\n{frozen}:{frozen}:ro")
with open(sys.argv[1], "w") as f:
    cfg.write(f)
EOF
    )
    # The folders that config points to, read-only at the same paths.
    local path
    for path in $(grep -oE '(file://)?/[^ ]+' "$conf" | sed 's|^file://||' | sort -u); do
        [ -e "$path" ] || continue
        case "$path" in */simple) path="${path%/simple}" ;; esac
        case "$path" in /run/host-ca.crt | */venv-constraints.txt) continue ;; esac
        mounts+=("-v" "$path:$path:ro")
    done
    printf '%s\n' "${mounts[@]}"
}

build_worker() {
    build_base
    local tmp started
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"; trap - RETURN' RETURN  # this call's return only
    mapfile -t mounts < <(pip_mounts "$tmp/pip.conf")
    started=$SECONDS
    say "podman build $IMAGE (BASE=$BASE_IMAGE)"
    # TORCH_INDEX_URL: the torch pin comes from this machine's wheel folder (find-links), so the
    # CPU index of the Dockerfile's default is not needed here; PyPI stands in as the index.
    local cache=()
    if [ "${ATRIC_NO_CACHE:-0}" = 1 ]; then cache=(--no-cache); fi
    podman build --isolation chroot --network host --format docker "${cache[@]}" "${mounts[@]}" \
        --build-arg BASE="$BASE_IMAGE" \
        --build-arg TORCH_INDEX_URL="${ATRIC_TORCH_INDEX_URL:-https://pypi.org/simple}" \
        -t "$IMAGE" -f Dockerfile . 2>&1 | tee "$tmp/build.log"
    # The slow layer (~200 wheels): podman prints "--> Using cache" right after its step when kept.
    local deps
    deps=$(awk '/STEP [0-9]+\/[0-9]+: RUN pip install -r / {seen=1; next}
                seen && /^--> / {print (/Using cache/ ? "cached" : "rebuilt"); exit}' "$tmp/build.log")
    say "dependency layer ${deps:-unknown}"
    say "worker image built in $((SECONDS - started)) s, $(image_size) bytes"
}

image_size() { podman image inspect --format '{{.Size}}' "$IMAGE"; }

# Run a command in a throwaway container of the image (chroot isolation, host network).
in_image() {
    local ctr status=0
    ctr=$(buildah from --pull-never "$IMAGE")
    buildah run --isolation chroot --network host "${envs[@]}" "$ctr" -- "$@" || status=$?
    buildah rm "$ctr" >/dev/null
    return "$status"
}

smoke() {
    build_worker
    check
}

check() {
    podman image exists "$IMAGE" || { echo "error: no image $IMAGE: deploy/image.sh build" >&2; exit 1; }
    local envs=()
    say "smoke: python src/tune.py --help"
    in_image python src/tune.py --help >/dev/null
    # Non-root: the image's USER (what docker/podman run use) and the uid a container gets.
    local user ids
    user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
    ids=$(in_image bash -c 'echo "$(id -u):$(id -g)"')
    if [ "$user" != 10001:10001 ] || [ "$ids" != 10001:10001 ]; then
        echo "error: the image must run as 10001:10001, not root (USER '$user', runs as $ids)" >&2
        exit 1
    fi
    say "smoke: runs as $ids, not root (USER $user)"
    say "smoke: import atric"
    in_image python -c "import atric, atric.ops.tuning, torch; print('atric', atric.__version__, 'torch', torch.__version__)"

    # The tune: storage URL, MLflow URI and S3 settings of the local stack, by environment:
    # taken from this environment when set (a test's throwaway stack), else from deploy/stack.sh.
    local names=(MLFLOW_TRACKING_URI ATRIC_OPTUNA_STORAGE AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
        AWS_ENDPOINT_URL AWS_DEFAULT_REGION MLFLOW_S3_ENDPOINT_URL ATRIC_S3_BUCKET)
    if [ -z "${ATRIC_OPTUNA_STORAGE:-}" ] || [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
        deploy/stack.sh status >/dev/null || { echo "error: the local stack is down: deploy/stack.sh up" >&2; exit 1; }
        eval "$(deploy/stack.sh env)"
    fi
    # The settings (a database password, S3 keys) reach the container through a 0600 file owned by
    # the image's user and mounted read-only, never as `--env NAME=value`: argv is public in `ps`.
    local name
    SMOKE_SECRETS=$(mktemp -d)
    trap 'rm -rf "$SMOKE_SECRETS"' EXIT
    ( umask 077
      for name in "${names[@]}"; do
          if [ -n "${!name:-}" ]; then printf '%s=%q\n' "$name" "${!name}"; fi
      done > "$SMOKE_SECRETS/env" )
    chown 10001:10001 "$SMOKE_SECRETS/env"
    envs+=("--volume" "$SMOKE_SECRETS/env:/run/atric/env:ro" "--env" "OMP_NUM_THREADS=1")
    say "smoke: a 1-trial tune on a tiny corpus against the stack"
    in_image bash -c 'set -euo pipefail; set -a; . /run/atric/env; set +a; mkdir -p /tmp/smoke && cd /tmp/smoke
        python - <<"EOF"
import sys
from pathlib import Path
sys.path.insert(0, "/workspace/tests")
import fakes  # the tiny layout of the tests, shipped in the image

root = Path.cwd()
fakes.write_fake_layout(root / "data")
raw = fakes.tiny_params(root, epochs=2)
raw["tune"] = {"space": {"lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
               "pruner": "none", "heartbeat_interval": 5}
fakes.write_params(root / "params.yaml", raw)
EOF
        python /workspace/src/tune.py --n-trials 1 --study-name "smoke-$(date +%s%N)" --no-report'
    local size
    size=$(image_size)
    say "smoke passed; image $IMAGE is $size bytes ($(awk -v b="$size" 'BEGIN {printf "%.2f GB", b / 1e9}'))"
}

case "${1:-}" in
    base) need; build_base ;;
    build) need; build_worker ;;
    smoke) need; smoke ;;
    check) need; check ;;
    size) image_size ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
