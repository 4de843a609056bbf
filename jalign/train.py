"""The training command line.

    python -m jalign.train --config=configs/quickstart.py --workdir=/tmp/jalign_quickstart \
        [--config.train.num_steps=200 ...] [--seeds=N] [--debug]

Runs one algorithm (`jalign.loop.run`) or, when `config.pipeline.stages` is set, a
multi-stage pipeline (`jalign.pipeline.run_pipeline`). `--seeds=N` runs it with seeds
0 .. N-1 in WORKDIR/seed_K and writes mean, std and 95% intervals over the seeds
(`jalign.sweep`). A data or config error ends
the command with one line, `error: ...` naming the file, line, field or config key,
and exit status 2; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import ast
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jalign import config_utils, distributed, loop, pipeline, sweep

# Errors a user fixes in their data or config (jalign.data.DataError is a ValueError);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)
EXIT_USAGE = 2

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file[:arg].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
flags.DEFINE_integer("seeds", 0, "Run the config with seeds 0..N-1 in WORKDIR/seed_K and "
                     "summarise them (mean, std, 95% t-interval); 0 = one run with config.seed.")
flags.DEFINE_bool("debug", False, "Show the full Python traceback of a data or config error.")


_stage_overrides: list[config_utils.StageOverride] = []  # split off argv by _parse_flags


def _parse_flags(argv: list[str]) -> list[str]:
    rest, _stage_overrides[:] = config_utils.split_stage_overrides(argv)
    sys.argv[:] = rest  # config_flags reads its overrides from sys.argv itself
    try:
        return app.parse_flags_with_usage(rest)
    except (KeyError, AttributeError) as e:  # ml_collections: an override of no such key
        if "--debug" in rest:
            raise
        text = str(e)
        try:  # KeyError's text is the repr of ml_collections' message
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
        message = " ".join(text.split())
        print(f"error: a --config.KEY=VALUE flag names no key of the config: {message}",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)


def train(config, workdir: str, seeds: int = 0):
    """One run or a pipeline, as the config says (over `seeds` seeds if > 0); returns the
    summary dict."""
    distributed.initialize(config)  # first: multi-process runs join their group here
    if seeds:
        return sweep.run_seeds(config, workdir, seeds)
    if config.pipeline.stages:
        return pipeline.run_pipeline(config, workdir)
    return loop.run(config, workdir)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax/absl INFO lines drown the progress bar
    try:
        config_utils.apply_stage_overrides(FLAGS.config, _stage_overrides)
        train(FLAGS.config, FLAGS.workdir, FLAGS.seeds)
    except USER_ERRORS as e:
        if FLAGS.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
