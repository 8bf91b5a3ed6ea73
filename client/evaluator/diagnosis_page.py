"""The pages of ``fedct diagnose``: ``index.html`` over the studies and a page per study.

A study page shows the probabilities, the decision at the model card's operating point and
what it means, the QA warnings, the series chosen and those rejected, the model's provenance,
and a slice viewer over the selected slices (slider, mouse wheel, arrow keys) with the
COVID-19 evidence overlay (on/off, opacity, colour bar).  The slices are PNG files beside the
page (``studies/NNN/``): a study of hundreds of 512² slices would not fit in one file.  The
same page is what ``fedct serve`` shows, which adds its own navigation at ``NAV_MARK``.

Evidence pictures come from ``common/model/cam.py`` alone, as in ``fedct evaluate``'s report:
``overlay`` (the evidence on one fixed scale for every study, the lungs outlined; the page's
opacity control fades that picture over the plain slice) and ``colour_bar`` with its values.
"""

from __future__ import annotations

import json
import shutil
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedct.client.evaluator.report import run_text
from fedct.common.cache.lung_mask import outline
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.model.cam import EVIDENCE_SCALE, colour_bar, evidence_slice, overlay

STUDIES = "studies"
COLOUR_BAR = "colour_bar.png"
NAV_MARK = "<!--fedct-nav-->"
OPACITY = 1.0  # the evidence picture's opacity when a page opens: as evaluate's report draws it
CLASS_NAMES = {
    "normal": "normal",
    "pneumonia_or_abnormal": "pneumonia or other abnormality",
    "covid19": "COVID-19",
}
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;border-bottom:1px solid #ccc;
padding-bottom:.2em;margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td{overflow-wrap:anywhere}ul.warn{padding-left:1.8em}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.4em .8em;margin:.3em 0}
.called{background:#fde2e1;border:1px solid #d9534f}.not-called{background:#e6f4ea;
border:1px solid #4a9d5b}.decision{padding:.6em 1em;margin:.6em 0;font-size:1.05em}
.decision strong{font-size:1.2em}.note{color:#555;font-size:.9em}
.layout{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}.side{flex:1;min-width:320px}
.stage{position:relative;width:512px;height:512px;background:#000;outline:none}
.stage img{position:absolute;left:0;top:0;width:512px;height:512px}
.stage:focus{box-shadow:0 0 0 3px #3b7dd8}
.controls{margin:.6em 0;display:flex;flex-direction:column;gap:.45em;width:512px}
.controls input[type=range]{width:100%}.bar{display:flex;align-items:center;gap:.5em}
.bar img{max-width:100%;height:auto}.bar span{font-size:.85em;color:#444}
.pbar{display:inline-block;height:.8em;background:#3b7dd8;vertical-align:middle}
"""
_SCRIPT = """
(function(){
const v=VIEW, slice=document.getElementById('slice'), ev=document.getElementById('evidence');
const slider=document.getElementById('slider'), label=document.getElementById('slice-label');
const toggle=document.getElementById('overlay-toggle'), opacity=document.getElementById('opacity');
const stage=document.getElementById('stage');
function show(i){
  i=Math.max(0,Math.min(v.count-1,i)); slider.value=i+1;
  slice.src=v.plain[i]; if(ev){ev.src=v.evidence[i];}
  label.textContent='selected slice '+(i+1)+' of '+v.count+' (slice '+(v.first+i+1)+
    ' of the series\\' '+v.total+')';
  stage.dataset.index=i;
}
function step(d){show(Number(slider.value)-1+d);}
slider.addEventListener('input',()=>show(Number(slider.value)-1));
stage.addEventListener('wheel',e=>{e.preventDefault();if(e.deltaY){step(e.deltaY>0?1:-1);}},
  {passive:false});
document.addEventListener('keydown',e=>{
  if(e.target.tagName==='INPUT')return;  // a slider moves itself; the slice slider calls show
  if(e.key==='ArrowUp'||e.key==='ArrowRight'){step(1);e.preventDefault();}
  if(e.key==='ArrowDown'||e.key==='ArrowLeft'){step(-1);e.preventDefault();}
});
function paint(){if(ev){ev.style.display=toggle.checked?'':'none';
  ev.style.opacity=opacity.value/100;}}
if(toggle){toggle.addEventListener('change',paint);opacity.addEventListener('input',paint);}
paint(); show(v.start);
})();
"""


def study_page_name(number: int) -> str:
    return f"{STUDIES}/{number:03d}.html"


def clear(out: Path) -> None:
    """Remove the pages and pictures of earlier diagnoses in ``out``."""
    shutil.rmtree(out / STUDIES, ignore_errors=True)
    (out / COLOUR_BAR).unlink(missing_ok=True)


def write_slices(
    out: Path,
    number: int,
    pixels: np.ndarray,
    cams: np.ndarray | None,
    lungs: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a study's selected slices (uint8 (S, H, W)) and their evidence pictures (with
    the outline of the lung mask ``lungs``, bool (S, H, W), where there is one); return where
    they are, relative to the study's page, and the slice with the most evidence."""
    folder = out / STUDIES / f"{number:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    plain, evidence = [], []
    for i, grey in enumerate(pixels):
        plain.append(_png(folder / f"slice_{i:03d}.png", grey))
        if cams is not None:
            border = None if lungs is None else outline(lungs[i])
            picture = overlay(grey, cams[i], outline=border)
            evidence.append(_png(folder / f"evidence_{i:03d}.png", picture))
    return {
        "count": len(pixels),
        "plain": [f"{folder.name}/{name}" for name in plain],
        "evidence": [f"{folder.name}/{name}" for name in evidence],
        "most_evidence": 0 if cams is None else evidence_slice(cams),
        "lungs_outlined": cams is not None and lungs is not None,
    }


def _png(path: Path, picture: np.ndarray) -> str:
    Image.fromarray(np.ascontiguousarray(picture)).save(path, compress_level=1)
    return path.name


def write_pages(out: Path, document: dict[str, Any]) -> None:
    """``index.html``, the colour bar and one page per study of a diagnoses document."""
    Image.fromarray(colour_bar()).save(out / COLOUR_BAR)
    (out / STUDIES).mkdir(exist_ok=True)
    for study in document["studies"]:
        (out / study["page"]).write_text(study_page(study, document), encoding="utf-8")
    (out / "index.html").write_text(index_page(document), encoding="utf-8")


def _page(title: str, body: str, script: str = "") -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>\n<body>{NAV_MARK}\n"
        f"<h1>{escape(title)}</h1>\n{body}\n{script}</body></html>\n"
    )


def index_page(document: dict[str, Any]) -> str:
    rows = []
    for study in document["studies"]:
        probs = study["probabilities"]
        decision = study["decision"]
        cells = [
            f'<td class="num">{study["number"]}</td>',
            f"<td>{escape(study['study'])}</td>",
            f"<td>{escape(study['source'])}</td>",
            *(
                f'<td class="num">{probs[name]:.3f}</td>' if probs else "<td>—</td>"
                for name in GLOBAL_CLASSES
            ),
            f"<td>{escape(decision['label']) if decision else escape(study['status'])}</td>",
            f'<td class="num">{len(study["qa"])}</td>',
            f'<td><a href="{escape(study["page"])}">page</a></td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(
        f"<th>{escape(h)}</th>"
        for h in (
            "#",
            "study",
            "source",
            *(f"p({CLASS_NAMES[n]})" for n in GLOBAL_CLASSES),
            "decision",
            "QA warnings",
            "",
        )
    )
    parts = [
        f"<p>{len(document['studies'])} studies of {escape(document['input'])}.</p>",
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        _operating_point(document),
        _unassigned(document),
        _provenance(document["model"]),
    ]
    return _page("fedct diagnoses", "\n".join(parts))


def study_page(study: dict[str, Any], document: dict[str, Any]) -> str:
    title = f"Study {study['number']}: {study['study']}"
    head = (
        f'<p class="note"><a href="../index.html">all studies of this input</a> · source '
        f"{escape(study['source'])}</p>"
    )
    if study["status"] != "diagnosed":
        body = [
            head,
            f'<p class="warn" id="reason">Not diagnosed: {escape(study["reason"] or "")}</p>',
            _rejected(study),
            _provenance(study["model"]),
        ]
        return _page(title, "\n".join(body))
    side = [
        _decision(study),
        _probabilities(study),
        _qa(study),
        _series(study),
        _rejected(study),
        _provenance(study["model"]),
    ]
    body = [head, '<div class="layout">', _viewer(study), '<div class="side">', *side, "</div>"]
    body.append("</div>")
    slices = study.get("slices") or {"count": 0}
    script = ""
    if slices["count"]:
        view = {
            "count": slices["count"],
            "plain": slices["plain"],
            "evidence": slices["evidence"],
            "start": slices["most_evidence"],
            "first": study["series"]["selected"][0],
            "total": study["series"]["slices"],
        }
        data = json.dumps(view).replace("</", "<\\/")
        script = f"<script>const VIEW={data};{_SCRIPT}</script>"
    return _page(title, "\n".join(body), script)


def _viewer(study: dict[str, Any]) -> str:
    slices = study.get("slices") or {"count": 0}
    if not slices["count"]:
        return "<div></div>"
    evidence = bool(slices["evidence"])
    layers = '<img id="slice" alt="CT slice">'
    if evidence:
        layers += f'<img id="evidence" alt="COVID-19 evidence" style="opacity:{OPACITY}">'
    controls = [
        f'<input type="range" id="slider" min="1" max="{slices["count"]}" value="1" '
        'aria-label="slice">',
        '<span id="slice-label"></span>',
        '<span class="note">mouse wheel over the image, or the arrow keys: next/previous '
        "slice</span>",
    ]
    if evidence:
        controls += [
            '<label><input type="checkbox" id="overlay-toggle" checked> COVID-19 evidence '
            "overlay</label>",
            f'<label>opacity <input type="range" id="opacity" min="0" max="100" '
            f'value="{round(OPACITY * 100)}"></label>',
            f'<div class="bar"><img src="../{COLOUR_BAR}" alt="colour bar"></div>',
            '<span class="note">evidence for COVID-19 against the other classes, per pixel on '
            f"one scale for every study (a region of 1 % of the scan's pixels at "
            f"{EVIDENCE_SCALE:g} adds {EVIDENCE_SCALE / 100:g} to the log-odds); "
            + (
                "the lungs outlined in cyan"
                if slices.get("lungs_outlined")
                else "no lung outline: no lung mask for this scan"
            )
            + "</span>",
        ]
    else:
        controls.append('<p class="warn">no evidence maps for this model</p>')
    return (
        f'<div><div class="stage" id="stage" tabindex="0">{layers}</div>'
        f'<div class="controls">{"".join(controls)}</div></div>'
    )


def _decision(study: dict[str, Any]) -> str:
    decision = study["decision"]
    css = "called" if decision["called_covid19"] else "not-called"
    return (
        f'<div class="decision {css}" id="decision"><strong>{escape(decision["label"])}'
        f"</strong><br>{escape(decision['meaning'])}</div>"
    )


def _probabilities(study: dict[str, Any]) -> str:
    rows = []
    for name in GLOBAL_CLASSES:
        p = study["probabilities"][name]
        mark = " (most likely)" if study["most_likely"] == name else ""
        rows.append(
            f"<tr><th>{escape(CLASS_NAMES[name])}{mark}</th>"
            f'<td class="num prob" data-class="{name}" data-p="{p!r}">{p:.3f}</td>'
            f'<td><span class="pbar" style="width:{round(200 * p)}px"></span></td></tr>'
        )
    note = (
        '<p class="note">The decision uses p(COVID-19) and the threshold alone; the most '
        "likely class is the largest of the three.</p>"
    )
    return f"<h2>Probabilities</h2><table>{''.join(rows)}</table>{note}"


def _qa(study: dict[str, Any]) -> str:
    if not study["qa"]:
        return "<h2>Quality</h2><p>No QA warnings.</p>"
    items = "".join(f'<li class="qa">{escape(w)}</li>' for w in study["qa"])
    return f'<h2>Quality</h2><ul class="warn">{items}</ul>'


def _series(study: dict[str, Any]) -> str:
    s = study["series"]
    rows = [
        ("format", s["format"]),
        ("series", f"{s['number'] or '—'} ({s['uid'] or 'no UID'})"),
        ("why this series", s["why"]),
        ("slices", f"{s['slices']}; slices {s['selected'][0] + 1}–{s['selected'][1]} scored"),
        ("spacing (z, y, x)", " × ".join(f"{v:g}" for v in s["spacing_mm"]) + " mm"),
        ("thickness", "—" if s["thickness_mm"] is None else f"{s['thickness_mm']:g} mm"),
        ("kernel, manufacturer", f"{s['kernel'] or '—'}, {s['manufacturer'] or '—'}"),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>Series</h2><table>{body}</table>"


def _rejected(study: dict[str, Any]) -> str:
    return _input_table("Not used", study["rejected"], files=True)


def _input_table(title: str, entries: list[dict[str, Any]], *, files: bool) -> str:
    """Inputs that were not used: their path, reason and detail (and file count)."""
    if not entries:
        return ""
    heads = ("path", "reason", "detail", *(("files",) if files else ()))
    head = "".join(f"<th>{h}</th>" for h in heads)
    rows = "".join(
        f"<tr><td>{escape(r['path'])}</td><td>{escape(r['reason'])}</td>"
        f"<td>{escape(r['detail'])}</td>"
        + (f"<td class='num'>{r['files']}</td>" if files else "")
        + "</tr>"
        for r in entries
    )
    return f"<h2>{title}</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _operating_point(document: dict[str, Any]) -> str:
    op = document["operating_point"]
    if not op["tuned"]:
        return (
            '<p class="warn">The model card stores no operating point: decisions use an '
            "arbitrary threshold of 0.5.</p>"
        )
    return (
        f"<p>Decisions: COVID-19 when p(COVID-19) ≥ {op['threshold']:.3f}, the operating point "
        f"chosen on {escape(op['chosen_on'])} (rule {escape(op['rule'])}; sensitivity "
        f"{op['sensitivity']:.2f}, specificity {op['specificity']:.2f} there).</p>"
    )


def _unassigned(document: dict[str, Any]) -> str:
    return _input_table("Inputs of no study", document["unassigned"], files=False)


def _provenance(model: dict[str, Any]) -> str:
    settings = model["cache_settings"]
    rows = [
        ("checkpoint", model["checkpoint"]),
        ("run, round", f"{run_text(model['run'])}; round {model['round']}"),
        ("weights sha256", model["sha256"]),
        ("backbone", model["backbone"]),
        (
            "input",
            f"{settings['size']}², middle {settings['fraction']:.0%} of the slices, "
            f"{settings['normalize']} normalisation",
        ),
        ("engine", model["engine"]),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f'<h2>Model</h2><table id="provenance">{body}</table>'
