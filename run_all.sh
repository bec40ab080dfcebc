#!/usr/bin/env bash
# Regenerate the paper's tables and figures.
#
#   bash run_all.sh [--profile NAME] [--seeds 0,1,2] [--out DIR] [--figures DIR] [--only NOTEBOOK]
#                   [--jobs N] [--plan]
#
# With no argument: profile "default" (the embedded SmolLM2 model on the offline
# Debian corpus, CPU).  Sets up the environment on first use (scripts/setup_env.sh),
# builds the offline corpus when absent, then runs the notebooks through
# metasae.harness.  Bad input fails within seconds, before any setup.  --jobs N (or
# METASAE_JOBS=N) runs the seeds of each per-seed notebook N at a time.

# First of all: the wall-clock origin of the whole run, environment setup included
# (results.json: wall_s_total).  A caller may set it earlier.
export METASAE_T0="${METASAE_T0:-$(date +%s.%N)}"
set -euo pipefail
# Seeds two at a time, one torch thread each (measured: 1.6x one process with two threads
# on the default's shape); METASAE_JOBS or --jobs overrides.
export METASAE_JOBS="${METASAE_JOBS:-2}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/setup_env.sh
source "$ROOT/scripts/setup_env.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export METASAE_PROG="bash run_all.sh"

case " $* " in
    *" -h "*|*" --help "*)
        py="$(metasae_python_for_checks)" || exit 1
        exec "$py" -m metasae.harness --help ;;
esac

# 1. Validate profile, seeds and output folders with whatever Python is at hand.
py="$(metasae_python_for_checks)" || exit 1
corpus="$("$py" -m metasae.harness --check "$@")" || exit $?

# 2. Environment (a no-op when nothing changed since the last run).
metasae_setup || exit 1

# 3. The offline corpus, when the profile uses it (a --plan needs none).
case " $* " in
    *" --plan "*) ;;
    *) metasae_ensure_corpus "$corpus" || exit $? ;;
esac

# 4. The notebooks.
exec "$METASAE_PY" -m metasae.harness "$@"
