#!/usr/bin/env bash
# Same-machine A/B of a change: run one command in this tree and in a copy of it with some files
# as they were at an older commit, alternately, so that both see the same machine (the device
# tool's machines differ from call to call: the eighth session's second H100 ran the transport's
# untouched host steps 2-2.5x slower than its first).
#
#   here:  bash benchmarks/ab_tree.sh pack REV PATH...      # writes .carry/ab/old.tar (carried)
#   GPU:   bash benchmarks/ab_tree.sh run ROUNDS CMD...     # CMD in new, old, new, old, ...
#
# e.g. the transport before the binary block ids and the single id upload (ed3b787, 4ed8e59):
#   bash benchmarks/ab_tree.sh pack 866d8a5 workers/transport benchmarks/transfer_phases.py \
#       benchmarks/transfer_bench.py
#   bash benchmarks/ab_tree.sh run 2 python3 benchmarks/transfer_bench.py --device cuda --blocks 1 256 1024
# The old tree is /tmp/ab-old (this tree with the packed files over it, .carry and .whl linked
# to this tree's), imported as kvrelay
# through /tmp/ab-site; each run's output is prefixed "new " or "old ". Run after gpu_run.sh's
# setup (Ray and the wheels in /tmp/site).
set -eu
case ${1:-} in
pack)
    rev=$2
    shift 2
    mkdir -p .carry/ab
    git archive "$rev" "$@" > .carry/ab/old.tar
    echo "$rev $*" > .carry/ab/old.txt
    echo "packed $(tar -tf .carry/ab/old.tar | grep -vc '/$') files of $rev into .carry/ab/old.tar"
    ;;
run)
    rounds=$2
    shift 2
    rm -rf /tmp/ab-old /tmp/ab-site && mkdir -p /tmp/ab-old /tmp/ab-site
    tar -C . --exclude=./.carry --exclude=./.whl --exclude=./.git --exclude=./.venv -cf - . | tar -C /tmp/ab-old -xf -
    tar -C /tmp/ab-old -xf .carry/ab/old.tar
    # what travels outside git (the tokenizer folder, the wheels) is shared, not copied: a
    # command naming .carry/... finds it from either tree (the seventeenth session's old run
    # failed on .carry/smol_tok)
    for d in .carry .whl; do [ -e "$d" ] && ln -sfn "$PWD/$d" "/tmp/ab-old/$d"; done
    ln -sfn /tmp/ab-old /tmp/ab-site/kvrelay
    echo "old = this tree with $(cat .carry/ab/old.txt)"
    export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
    new=$PWD
    for _ in $(seq "$rounds"); do
        (cd "$new" && PYTHONPATH=/tmp/site "$@" 2>&1 | sed 's/^/new /')
        (cd /tmp/ab-old && PYTHONPATH=/tmp/ab-site:/tmp/site "$@" 2>&1 | sed 's/^/old /')
    done
    ;;
*)
    echo "usage: $0 pack REV PATH... | run ROUNDS CMD..." >&2
    exit 2
    ;;
esac
