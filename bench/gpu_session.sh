#!/usr/bin/env bash
# The GPU numbers of issue 6 on a lent H100 (docs/scaling.md, "One H100"), in calls that each end
# within the device tool's 10-minute limit. Run from the repository root; the wheels the machine
# lacks (transformers >= 5.24 for the oracle, ml-collections; flax only if the machine's is older
# than ours) sit in .whl/ (carried).
#   bench/gpu_session.sh start        # moe.py (no tiling sweep) and attention.py (default blocks), then
#                                     # gpu_step.py in the background with the MoE back end that won at
#                                     # 1,024 tokens and the attention back end that won the sliding
#                                     # layers' canvas pass at batch 4; follows its log
#   bench/gpu_session.sh step ARGS    # gpu_step.py ARGS in the background; follows its log
#   bench/gpu_session.sh wait         # follows the log of the gpu_step.py started before, to its end
#   bench/gpu_session.sh tilings      # moe.py's sweep of the pallas_gpu kernels over GpuTiling variants
#   bench/gpu_session.sh blocks       # attention.py's sweep of the attention kernel over GpuBlocks variants
# MOE_ARGS passes options to moe.py; BUDGET_S (default 560) is how long a call follows the log.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
LOG=/tmp/gpu_step.log PID=/tmp/gpu_step.pid
DEADLINE=$((SECONDS + ${BUDGET_S:-560}))
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"

install() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    python3 -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:3])) < (0, 12, 8))" ||
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --upgrade \
            .whl/fallback/*.whl
}

launch() {  # gpu_step.py "$@" in its own session: it outlives this call, the machine stays warm
    setsid nohup python3 bench/gpu_step.py "$@" > $LOG 2>&1 < /dev/null &
    echo $! > $PID
}

follow() {  # print the log's new lines until gpu_step.py ends or the budget is spent
    local shown=0 n
    while [ $SECONDS -lt $DEADLINE ]; do
        n=$(wc -l < $LOG)
        [ "$n" -gt "$shown" ] && sed -n "$((shown + 1)),${n}p" $LOG && shown=$n
        kill -0 "$(cat $PID)" 2> /dev/null || break
        sleep 5
    done
    cp $LOG "$OUT/gpu_step.log"
    kill -0 "$(cat $PID)" 2> /dev/null && echo "gpu_step.py still running: call 'wait'" || echo "gpu_step.py finished"
}

case "${1:-start}" in
start)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    install
    python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" || exit 1
    python3 bench/moe.py --repeats 10 --tilings ${MOE_ARGS:-} 2>&1 | grep -v "^[EWI]0000" | tee "$OUT/moe.log"
    impl=$(sed -n 's/^fastest at 1024 tokens, none weights: \([a-z_]*\) .*/\1/p' "$OUT/moe.log")
    # at most half of what is left, so gpu_step.py starts in this call (xla attention if this runs out)
    left=$(((DEADLINE - SECONDS) / 2)); [ "$left" -ge 1 ] || left=1
    timeout $left python3 bench/attention.py --repeats 10 --canvases 1 4 --blocks default \
        2>&1 | grep -v "^[EWI]0000" | tee "$OUT/attention.log"
    attention=$(sed -n 's/^fastest for sliding canvas at batch 4: \([a-z_]*\) .*/\1/p' "$OUT/attention.log")
    echo "gpu_step.py --moe-impl ${impl:=auto} --attention-impl ${attention:=xla}"
    launch --moe-impl "$impl" --attention-impl "$attention"
    follow
    ;;
step)
    shift
    install
    launch "$@"
    follow
    ;;
wait)
    follow
    ;;
tilings)
    install
    timeout $((DEADLINE - SECONDS)) python3 bench/moe.py --repeats 10 --impls pallas_gpu --canvases 1 4 ${MOE_ARGS:-} \
        2>&1 | grep -v "^[EWI]0000" | tee "$OUT/tilings.log"
    ;;
blocks)
    install
    timeout $((DEADLINE - SECONDS)) python3 bench/attention.py --repeats 10 --canvases 1 4 16 \
        2>&1 | grep -v "^[EWI]0000" | tee "$OUT/blocks.log"
    ;;
*)
    echo "usage: bench/gpu_session.sh start|step ARGS|wait|tilings|blocks" >&2; exit 2
    ;;
esac
