"""The figure rules as one function, for the quick figure tests and for notebooks run in kernels.

A title; both axes labelled (units where there are any); a legend where several series share an
axes; a bar chart's value axis starting at zero, or a title that says plainly where it is cut; an
opaque background, so that the figure reads in JupyterLab's dark theme as in its light one.
"""

from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

CUT = ("axis starts at", "axis is cut", "cut at", "starts at")


def figure_problems(fig: Figure) -> list[str]:
    """What breaks the rules in `fig`, one line per problem (empty: none)."""
    problems = []
    face = fig.patch.get_facecolor()
    if face[3] < 1:
        problems.append(f"transparent background {face}")
    suptitle = fig._suptitle.get_text() if fig._suptitle else ""
    legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
    explained = {t.get_text() for legend in legends for t in legend.get_texts()}  # one legend may serve all
    for index, ax in enumerate(fig.axes):
        if not ax.axison or ax.get_label() == "<colorbar>":
            continue
        where = f"axes {index} ({ax.get_title() or suptitle!r})"
        title = ax.get_title() or suptitle
        if not title:
            problems.append(f"{where}: no title")
        if not ax.get_xlabel() or not ax.get_ylabel():
            problems.append(f"{where}: an axis without a label")
        named = {h.get_label() for h in ax.get_lines() + ax.collections + ax.containers + ax.patches
                 if not h.get_label().startswith("_")}
        if len(named) > 1 and not named <= explained:
            problems.append(f"{where}: {len(named)} series and no legend")
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        if bars and not isinstance(bars[0], ErrorbarContainer):
            horizontal = bars[0].orientation == "horizontal"
            low = ax.get_xlim()[0] if horizontal else ax.get_ylim()[0]
            scale = ax.get_xscale() if horizontal else ax.get_yscale()
            if scale == "linear" and low != 0 and not any(word in title.lower() for word in CUT):
                problems.append(f"{where}: a bar axis starting at {low:g} without saying so in the title")
    return problems
