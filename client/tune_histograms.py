"""A site's share of the federated operating point: histograms of the COVID-19 probability
on its tune split (see common/operating_point_hist.py).

Only counts per bin leave the site, never a scan's score, label or identifier.  A site
without a tune split sends zeros, so that every site's reply has the same metric keys.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from client.local import _model_for
from client.site_data import Site
from common.cache import CacheDataset, make_loader
from common.operating_point_hist import BINS_KEY, COVID_KEY, OTHER_KEY, score_histograms
from common.training import evaluate


def tune_histograms(site: Site, arrays: ArrayRecord, config: ConfigRecord) -> MetricRecord:
    """Counts of COVID-19 and of other tune scans per bin of p(COVID-19), for
    ``config[BINS_KEY]`` bins, scored with the model the site evaluates."""
    bins = int(config[BINS_KEY])
    data = CacheDataset(site.cache_dir, ["tune"])
    if len(data) == 0:
        covid = other = np.zeros(bins, np.int64)
    else:
        model = _model_for(site, config, arrays)
        result = evaluate(model, make_loader(data, int(config["batch-size"])), site.device)
        covid, other = score_histograms(result.labels, result.probs, bins)
    return MetricRecord({COVID_KEY: covid.tolist(), OTHER_KEY: other.tolist()})
