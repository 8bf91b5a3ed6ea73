"""The coordinator's Flower ServerApp: settings from the run config, the run directory's lock,
a fresh or resumed run, the rounds of :mod:`fedct.server.rounds`, then the cross-site validation of
:mod:`fedct.server.crosssite`.  Each round also logs its progress line (server/progress.py) and
writes TensorBoard events (server/tensorboard_log.py); the run directory records the Flower
run id, and every card the fingerprints of the site caches the coordinator can see
(server/site_caches.py).  A run in which no round trained any site fails.  See
docs/federated.md."""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedct.common.provenance import software_versions
from fedct.common.run.directory import RunDirectory
from fedct.server.central_eval import CentralEvaluator
from fedct.server.crosssite import cross_site_validation
from fedct.server.global_model import GlobalModel
from fedct.server.progress import ProgressLine
from fedct.server.roster import Roster, nothing_trained
from fedct.server.rounds import Federation
from fedct.server.run_lock import RunLock
from fedct.server.settings import ServerSettings
from fedct.server.site_caches import CARD_KEY, changed_since, fingerprints
from fedct.server.strategies import build_strategy, restore_strategy_state
from fedct.server.superlink_outage import superlink_outage
from fedct.server.tensorboard_log import TensorBoardLog

app = ServerApp()


def _open_run(
    settings: ServerSettings, run_dir: RunDirectory, model: GlobalModel, strategy: Strategy
) -> tuple[str, int, Roster]:
    """(run key, first round, the sites' names so far): a new run starts at round 0 (the
    initial model); a resumed one repairs what a crash left (common/run/directory.py), loads
    the last checkpoint's weights and optimiser state and goes on after it."""
    if settings.resume_from is None:
        return run_dir.claim(), 0, Roster()
    for note in run_dir.recover(settings.best_metric):
        log(WARNING, "%s", note)
    checkpoint = run_dir.load_latest()
    model.load_full_state(checkpoint.arrays)
    restore_strategy_state(strategy, checkpoint.strategy_state)
    log(INFO, "resuming %s after round %d", run_dir.path, checkpoint.round)
    card = run_dir.read_json(run_dir.card_path(checkpoint.round).name) or {}
    return run_dir.run_key(), checkpoint.round + 1, Roster.from_card(card)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation described by the run config, holding the run
    directory's lock throughout (server/run_lock.py)."""
    settings = ServerSettings.from_run_config(context.run_config)
    with (
        superlink_outage(grid, settings.superlink_grace, settings.run_dir),
        RunLock(settings.run_dir, str(context.run_id)) as lock,
    ):
        if lock.took_over:
            log(WARNING, "%s", lock.took_over)
        _run(grid, context, settings, RunDirectory(settings.run_dir, guard=lock.check))


def _run(grid: Grid, context: Context, settings: ServerSettings, run_dir: RunDirectory) -> None:
    model = GlobalModel(settings.model, settings.seed)
    strategy = build_strategy(
        settings.strategy,
        fraction_train=settings.fraction_train,
        min_train_nodes=settings.min_train_nodes,
        min_available_nodes=settings.min_available_nodes,
        proximal_mu=settings.training.proximal_mu,
        server_lr=settings.server_lr,
        client_lr=settings.training.lr,
        statistics_keys=model.statistics_keys(),
        malicious_sites=settings.malicious_sites,
    )
    run_key, first_round, roster = _open_run(settings, run_dir, model, strategy)
    run_dir.write_json(
        "run_config.json",
        {
            "run_key": run_key,
            "first_round": first_round,
            "flower_run_id": context.run_id,
            "run_config": dict(context.run_config),
        },
    )
    log(INFO, "run directory: %s", run_dir.path)
    evaluator = CentralEvaluator.for_run(model, settings)
    federation = Federation(
        grid, strategy, settings, run_dir, model, evaluator, context.run_config, run_key, roster
    )
    federation.card_extras = {
        "run": {"run_key": run_key, "flower_run_id": context.run_id},
        "software": software_versions(),
        CARD_KEY: fingerprints(context.run_config),
    }
    if first_round > 0 and (
        changed := changed_since(run_dir.latest_card(), federation.card_extras[CARD_KEY])
    ):
        log(WARNING, "%s", changed)
    if first_round > settings.num_rounds:
        log(INFO, "all %d rounds are done; raise num-server-rounds to go on", settings.num_rounds)
        return
    progress = ProgressLine(
        run_dir,
        settings.num_rounds,
        lambda text: log(INFO, "%s", text),
        lambda text: log(WARNING, "%s", text),
    )
    with TensorBoardLog(run_dir, first_round, dict(context.run_config)) as tensorboard:
        federation.observers += [progress, tensorboard]
        final = federation.run(model.arrays(), first_round)
    if settings.cross_site:
        cross_site_validation(federation, final)
    if failed := nothing_trained(run_dir.metrics(), first_round):
        raise RuntimeError(failed)
