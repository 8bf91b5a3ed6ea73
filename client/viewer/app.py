"""The viewer's web app (Starlette): upload a study, follow its progress, open its page.

Routes: ``/`` the upload page with the studies seen since the viewer started; ``POST
/upload`` a zip or a folder's files; ``/jobs/ID`` a job's progress as JSON; ``/results/ID/…``
the pages and pictures ``fedct diagnose`` wrote for it (a study page gets the viewer's
navigation); ``/login`` when a token is required.

Every answer to a bad request is one readable line (JSON ``{"error": …}`` for the page's
scripts), never a stack trace.  Requests must name the host the viewer listens on (a page of
another site cannot reach it through DNS rebinding), uploads must come from the viewer's own
page (Origin), and with a token every request must carry it (a cookie set by ``/login``).
"""

from __future__ import annotations

import hmac
from html import escape
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from fedct.client.evaluator.diagnosis_page import NAV_MARK, OPACITY
from fedct.client.evaluator.report import run_text
from fedct.client.evaluator.study_input import InputError
from fedct.client.viewer.jobs import Jobs

COOKIE = "fedct_viewer"
_MULTIPART_OVERHEAD = 1 << 20  # headers and boundaries around the files, in bytes


def create_app(
    jobs: Jobs, *, hosts: list[str], token: str | None = None, secure: bool = False
) -> Starlette:
    """The app over ``jobs``; ``hosts``: the Host names it answers to; ``token``: required
    from every request when set; ``secure``: served over TLS (the cookie says so)."""

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.cookies.get(COOKIE) or request.headers.get("authorization", "")
        given = given.removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), token.encode())

    def guard(handler: Any) -> Any:
        async def guarded(request: Request) -> Response:
            if not authorised(request):
                if request.method == "GET" and request.url.path == "/":
                    return RedirectResponse("/login", status_code=303)
                return _error("a token is required: open /login", 401)
            return await handler(request)

        return guarded

    async def home(request: Request) -> Response:
        return HTMLResponse(_home_page(jobs))

    async def upload(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            return _error("uploads are taken from the viewer's own page only", 403)
        size = int(request.headers.get("content-length") or 0)
        if size > jobs.limits.max_bytes + _MULTIPART_OVERHEAD:
            return _error(f"the upload is larger than {jobs.limits.max_bytes >> 20} MiB", 413)
        try:
            async with request.form(
                max_files=jobs.limits.max_files, max_fields=jobs.limits.max_files + 10
            ) as form:
                files = [v for v in form.getlist("files") if isinstance(v, UploadFile)]
                named = [(f.filename or "upload", f.file) for f in files]
                job = jobs.save(str(form.get("name") or ""), named)
        except InputError as exc:
            return _error(str(exc), 400)
        except Exception as exc:  # the multipart parser's own refusals (too many files…)
            return _error(f"the upload could not be read: {_first_line(exc)}", 400)
        return JSONResponse({"job": job.id})

    async def job_status(request: Request) -> Response:
        job = jobs.get(request.path_params["job"])
        if job is None:
            return _error("no such upload", 404)
        return JSONResponse(job.status())

    async def studies(request: Request) -> Response:
        return JSONResponse(jobs.listing())

    async def result(request: Request) -> Response:
        job = jobs.get(request.path_params["job"])
        if job is None or job.state == "expired":
            return HTMLResponse(_message_page("This study's files were deleted."), 404)
        base = job.out.resolve()
        path = (base / request.path_params["path"]).resolve()
        if not path.is_relative_to(base) or not path.is_file() or path.name.startswith("."):
            return _error("no such file", 404)
        if path.suffix == ".html":
            page = path.read_text(encoding="utf-8").replace(NAV_MARK, _NAV, 1)
            return HTMLResponse(page, headers=_NO_STORE)
        return FileResponse(path, headers=_NO_STORE)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(_login_page(""))
        form = await request.form()
        given = str(form.get("token") or "")
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(_login_page("That token is not the viewer's."), 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, secure=secure, samesite="strict")
        return response

    routes = [
        Route("/", guard(home)),
        Route("/upload", guard(upload), methods=["POST"]),
        Route("/jobs/{job}", guard(job_status)),
        Route("/studies", guard(studies)),
        Route("/results/{job}/{path:path}", guard(result)),
        Route("/login", login, methods=["GET", "POST"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
    return Starlette(routes=routes, middleware=middleware)


_NO_STORE = {"Cache-Control": "no-store"}  # patient pixels stay out of the browser's cache
_NAV = (
    '<p class="note" id="viewer-nav"><a href="/">← fedct viewer: upload another study, '
    "studies seen</a></p>"
)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;border-bottom:1px solid #ccc;padding-bottom:.2em}
.box{border:1px solid #ccc;padding:1em;margin:.8em 0;background:#fafafa}
.error{background:#fde2e1;border:1px solid #d9534f;padding:.5em .8em}
progress{width:100%;height:1.2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25em .6em}th{background:#f3f3f3;text-align:left}
.note{color:#555;font-size:.9em}
"""

_SCRIPT = """
const $=id=>document.getElementById(id);
function fail(text){
  $('message').textContent=text;$('message').hidden=false;$('progress').hidden=true;}
function post(data){
  $('message').hidden=true;$('progress').hidden=false;$('bar').value=0;
  $('step').textContent='uploading';
  const xhr=new XMLHttpRequest();xhr.open('POST','/upload');
  xhr.upload.onprogress=e=>{if(e.lengthComputable){$('bar').value=0.3*e.loaded/e.total;
    $('step').textContent='uploading '+Math.round(100*e.loaded/e.total)+' %';}};
  xhr.onload=()=>{let r={};try{r=JSON.parse(xhr.responseText);}catch(e){}
    if(xhr.status!==200){fail(r.error||('upload refused ('+xhr.status+')'));return;}
    follow(r.job);};
  xhr.onerror=()=>fail('the upload did not reach the viewer');
  xhr.send(data);
}
function follow(job){
  fetch('/jobs/'+job).then(r=>r.json()).then(s=>{
    $('bar').value=0.3+0.7*s.share;$('step').textContent=s.step;
    if(s.state==='failed'){fail(s.error);refresh();return;}
    if(s.state==='done'){refresh();
      const ok=s.studies.filter(x=>x.status==='diagnosed');
      if(s.studies.length===1&&ok.length===1){location.href=ok[0].page;return;}
      $('progress').hidden=true;if(!ok.length){fail(s.studies.map(x=>x.reason).join('; '));}
      return;}
    setTimeout(()=>follow(job),400);}).catch(()=>fail('lost the viewer'));
}
$('zip-form').addEventListener('submit',e=>{e.preventDefault();const f=$('zip').files[0];
  if(!f){fail('choose a zip file first');return;}
  const d=new FormData();d.append('name',f.name);d.append('files',f,f.name);post(d);});
$('folder-form').addEventListener('submit',e=>{e.preventDefault();const fs=$('folder').files;
  if(!fs.length){fail('choose a folder first');return;}
  const d=new FormData();d.append('name',fs[0].webkitRelativePath.split('/')[0]);
  for(const f of fs){d.append('files',f,f.webkitRelativePath||f.name);}post(d);});
function refresh(){fetch('/studies').then(r=>r.json()).then(jobs=>{
  const rows=[];for(const j of jobs){for(const s of j.studies){
    const p=s.p_covid19===null?'—':s.p_covid19.toFixed(3);
    const link=j.state==='expired'?'deleted':'<a href="'+s.page+'">open</a>';
    rows.push('<tr><td>'+esc(j.name)+'</td><td>'+esc(s.study)+'</td><td>'+
      esc(s.label||s.status)+'</td><td>'+p+'</td><td>'+link+'</td></tr>');}
    if(j.state==='failed'){rows.push('<tr><td>'+esc(j.name)+'</td><td colspan="4">'+
      esc(j.error)+'</td></tr>');}}
  $('seen').innerHTML=rows.length?rows.join(''):'<tr><td colspan="5">none yet</td></tr>';});}
function esc(t){const d=document.createElement('div');d.textContent=t;return d.innerHTML;}
refresh();
"""


def _home_page(jobs: Jobs) -> str:
    info = jobs.diagnoser.model_info
    op = jobs.diagnoser.op
    if jobs.diagnoser.tuned:
        decision = (
            f"COVID-19 is called when p(COVID-19) ≥ {op.threshold:.3f}, the model card's "
            f"operating point, chosen on {escape(op.chosen_on)} (sensitivity "
            f"{op.sensitivity:.2f}, specificity {op.specificity:.2f} there)."
        )
    else:
        decision = "The model card stores no operating point: decisions use an arbitrary 0.5."
    limits = jobs.limits
    body = f"""
<p>Model {escape(info["checkpoint"])} ({escape(run_text(info["run"]))}; round
{info["round"]}, sha256 {escape(info["sha256"][:12])}…, {escape(info["backbone"])},
engine {escape(info["engine"])}). {decision}</p>
<div class="box"><h2>Diagnose a study</h2>
<form id="zip-form"><label>A zip of the study's files: <input type="file" id="zip"
 accept=".zip,application/zip"></label> <button id="zip-send">Upload and diagnose</button></form>
<p>or</p>
<form id="folder-form"><label>A folder (DICOM, NIfTI or slice images): <input type="file"
 id="folder" webkitdirectory multiple></label> <button id="folder-send">Upload and
 diagnose</button></form>
<p class="note">At most {limits.max_bytes >> 20} MiB and {limits.max_files} files. The files are
deleted as soon as the study is scored; its pages {jobs.keep / 60:g} minutes later, and
everything when the viewer stops.</p>
<div id="progress" hidden><progress id="bar" max="1" value="0"></progress>
<span id="step"></span></div>
<p id="message" class="error" hidden></p></div>
<h2>Studies seen since the viewer started</h2>
<table><thead><tr><th>upload</th><th>study</th><th>decision</th><th>p(COVID-19)</th>
<th>page</th></tr></thead><tbody id="seen"></tbody></table>
<p class="note">The evidence overlay opens at {OPACITY:.0%} opacity; each study page has a
slider, the mouse wheel and the arrow keys to move through its slices.</p>
"""
    return _page("fedct viewer", body, f"<script>{_SCRIPT}</script>")


def _login_page(message: str) -> str:
    note = f'<p class="error">{escape(message)}</p>' if message else ""
    body = f"""{note}<form method="post" action="/login"><label>Token:
<input type="password" name="token" autocomplete="current-password"></label>
<button>Open the viewer</button></form>"""
    return _page("fedct viewer: token", body)


def _message_page(message: str) -> str:
    return _page("fedct viewer", f'<p>{escape(message)}</p><p><a href="/">back</a></p>')


def _page(title: str, body: str, script: str = "") -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{body}{script}</body></html>"
    )
