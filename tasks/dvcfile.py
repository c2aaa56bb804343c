"""``dvc.yaml``, generated from the stage table: ``python -m tasks.dvcfile > dvc.yaml``.

``tests/test_pipeline.py`` checks that the committed file is what this module writes.
"""

from __future__ import annotations

from tasks.pipeline import ARGUMENTS, STAGES, Stage

DVC_YAML_HEADER = """\
# The ULMFiT pipeline (Howard & Ruder 2018). Each stage runs 'ulmfit <stage>' (a Prefect flow,
# tracked in MLflow). Generated from the stage table in tasks/pipeline.py:
# python -m tasks.dvcfile > dvc.yaml (tests/test_pipeline.py checks that the two agree).
# Run it with 'ulmfit repro'; see docs/pipeline.md.
"""


def render_dvc_yaml() -> str:
    """``dvc.yaml``: one matrix stage per table row with arguments (over ``datasets`` and the
    directions), a ``foreach`` over ``controls`` for the control stage."""
    lines = [DVC_YAML_HEADER.rstrip("\n"), "stages:", *(_stage(stage) for stage in STAGES)]
    return "\n".join(lines) + "\n"


def _stage(stage: Stage) -> str:
    lines = [f"  {stage.group}:"]
    indent = "    "
    if "name" in stage.args:  # one stage per entry of the controls mapping
        lines += [f"    foreach: {ARGUMENTS['name'].matrix}", "    do:"]
        indent = "      "
    elif stage.args:
        lines.append("    matrix:")
        lines += [f"      {arg}: {ARGUMENTS[arg].matrix}" for arg in stage.args]
    return "\n".join(lines + [indent + line for line in _body(stage)])


def _body(stage: Stage) -> list[str]:
    """The cmd, deps, params, outs, metrics and plots lines of one stage (indent 0). Only the
    headline figures are DVC metrics; every stage's own metrics file is an uncached output."""
    items = {arg: ARGUMENTS[arg].placeholder for arg in stage.args}
    options = "".join(f" --{arg} {value}" for arg, value in items.items())
    if "name" in stage.args:  # a control's data are its dataset's
        items["dataset"] = ARGUMENTS["dataset"].placeholder
    spec = stage.spec(**items)
    lines = [f"cmd: ulmfit {stage.command}{options}", "deps:"]
    lines += [f"  - {dep}" for dep in spec.deps]
    lines.append("params:")
    lines += [f"  - {param}" for param in spec.params]
    lines.append("outs:")
    lines += [f"  - {out}" for out in spec.outs]
    if stage.metrics:  # detailed counts and timings: outputs, not what `dvc metrics show` lists
        lines += [f"  - {spec.metrics}:", "      cache: false"]
        lines += [f"  - {spec.run_record}:", "      cache: false"]
    if spec.headline:
        lines.append("metrics:")
        for path in spec.headline:
            lines += [f"  - {path}:", "      cache: false"]
    if spec.plots:
        lines += ["plots:", f"  - {spec.curve}:", "      cache: false"]
        if stage.group == "evaluate":  # its curve is the confusion matrix
            lines += ["      template: confusion", "      x: predicted", "      y: actual"]
        else:
            lines += ["      x: step", "      y: loss"]
        lines.append(f"  - {spec.figure}")
    return lines


if __name__ == "__main__":
    print(render_dvc_yaml(), end="")
