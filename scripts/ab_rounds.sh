# Sourced by scripts/ab_bench.sh and scripts/ab_train.sh: their A/B protocol's rounds.
#
# ab_rounds: for every round 1..ROUNDS and every cell of CELLS, calls the sourcing script's
# `run SIDE BIN ENV CELL ROUND` for A (BIN $A, environment $ENV_A) and B ($B, $ENV_B), A first
# in odd rounds and B first in even ones, so a drift of the machine's speed hits both alike.
ab_rounds() {
  local round cell
  for round in $(seq 1 "$ROUNDS"); do
    for cell in $CELLS; do
      if [ $((round % 2)) -eq 1 ]; then
        run A "$A" "${ENV_A:-}" "$cell" "$round"; run B "$B" "${ENV_B:-}" "$cell" "$round"
      else
        run B "$B" "${ENV_B:-}" "$cell" "$round"; run A "$A" "${ENV_A:-}" "$cell" "$round"
      fi
    done
  done
}
