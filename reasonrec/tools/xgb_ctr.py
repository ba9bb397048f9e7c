"""Gradient-boosted trees for CTR with xgboost's core API (``xgboost.train``; no sklearn wrapper).

Features: the :mod:`ctr_features` dense features, leave-self-out (history length, item
popularity, category / brand affinity, item-history co-occurrence). Ids are left out on purpose: trees on raw
id numbers would learn the P5 id order, not taste.
Early stopping on the CTR valid split's AUC. The booster is saved as UBJSON bytes in a uint8
array inside the safetensors weights (no pickle).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reasonrec import gbdt
from reasonrec.metrics import auc, log_loss
from reasonrec.tools.base import Tool, ToolData, ToolInputError, register
from reasonrec.tools.ctr_features import DENSE_FEATURES, CTRFeaturizer, check_ctr_input, ctr_rows, histories_for


@register
class XGBCTR(Tool):
    name = "xgb_ctr"
    tasks = ("ctr",)
    defaults: dict[str, Any] = dict(
        dense_features=list(DENSE_FEATURES),
        n_folds=5,
        num_boost_round=400,
        early_stopping_rounds=30,
        max_depth=6,
        eta=0.1,
        subsample=0.9,
        colsample_bytree=0.9,
        min_child_weight=1.0,
        reg_lambda=1.0,
        nthread=2,
        seed=0,
        report_every=25,
    )

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.booster = None
        self.feat: CTRFeaturizer | None = None
        self.train_info: dict[str, Any] = {}

    def p(self, key: str) -> Any:
        return self.params.get(key, self.defaults[key])

    def _features(self, users: np.ndarray, items: np.ndarray, histories, oof: bool = False) -> np.ndarray:
        return self.feat.dense_raw(users, items, histories, oof=oof)

    def _booster_params(self) -> dict[str, Any]:
        return {
            "objective": "binary:logistic",
            "eval_metric": ["logloss", "auc"],
            "tree_method": "hist",
            "max_depth": int(self.p("max_depth")),
            "eta": float(self.p("eta")),
            "subsample": float(self.p("subsample")),
            "colsample_bytree": float(self.p("colsample_bytree")),
            "min_child_weight": float(self.p("min_child_weight")),
            "lambda": float(self.p("reg_lambda")),
            "nthread": int(self.p("nthread")),
            "seed": int(self.p("seed")),
        }

    def fit(self, data: ToolData, reporter=None, start_epoch: int = 0) -> dict[str, float]:
        import xgboost as xgb

        self.n_users, self.n_items = data.n_users, data.n_items
        u, i, y = ctr_rows(data, "train")
        if len(y) == 0:
            raise ToolInputError(f"{self.name}: empty CTR train split")
        resume = self.booster is not None and start_epoch > 0
        if not resume:
            self.feat = CTRFeaturizer.from_data(data, self.p("dense_features"), int(self.p("n_folds")))
        # training rows get out-of-fold statistics (see ctr_features): no label leak
        dtrain = xgb.DMatrix(
            self._features(u, i, histories_for(data, u), oof=True),
            label=y,
            feature_names=list(self.feat.dense_features),
        )
        evals = [(dtrain, "train")]
        has_valid = "valid" in data.ctr and len(data.ctr["valid"][2]) > 0
        if has_valid:
            vu, vi, vy = ctr_rows(data, "valid")
            dvalid = xgb.DMatrix(
                self._features(vu, vi, histories_for(data, vu)), label=vy, feature_names=list(self.feat.dense_features)
            )
            evals.append((dvalid, "valid"))
        every = max(1, int(self.p("report_every")))

        class Report(xgb.callback.TrainingCallback):
            # an "epoch" for the reporter is a block of ``report_every`` boosting rounds
            def after_iteration(self, model, epoch, evals_log):
                if reporter is not None and (epoch + 1) % every == 0 and "valid" in evals_log:
                    v = evals_log["valid"]
                    reporter(
                        start_epoch + epoch // every,
                        {"auc": float(v["auc"][-1]), "logloss": float(v["logloss"][-1]), "round": epoch},
                    )
                return False

        bst = xgb.train(
            self._booster_params(),
            dtrain,
            num_boost_round=int(self.p("num_boost_round")),
            evals=evals,
            early_stopping_rounds=int(self.p("early_stopping_rounds")) if has_valid else None,
            verbose_eval=False,
            callbacks=[Report()],
            xgb_model=self.booster if resume else None,
        )
        if has_valid:
            # keep only the trees up to the best valid AUC (auc is the last metric, so it drives stopping)
            bst = bst[: bst.best_iteration + 1]
        self.booster = bst
        self.train_info = {"rounds": int(bst.num_boosted_rounds())}
        if not has_valid:
            return {}
        p = self.booster.predict(dvalid)
        return {"auc": auc(vy, p), "logloss": log_loss(vy, p)}

    def predict_ctr(self, users: np.ndarray, items: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        if self.booster is None:
            raise RuntimeError(f"{self.name}: not trained")
        users = np.asarray(users, np.int64).reshape(-1)
        items = np.asarray(items, np.int64).reshape(-1)
        check_ctr_input(self.n_items, users, items, histories)
        # Columns in the booster's feature order (self.feat.dense_features), read in place.
        return gbdt.predict(self.booster, self._features(users, items, histories)).astype(np.float32)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.booster is None:
            raise RuntimeError(f"{self.name}: not trained")
        fcfg, arrays = self.feat.state()
        arrays["booster_ubj"] = np.frombuffer(bytes(self.booster.save_raw(raw_format="ubj")), dtype=np.uint8).copy()
        return {
            "params": self.params,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "features": fcfg,
            "train_info": self.train_info,
        }, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> XGBCTR:
        import xgboost as xgb

        tool = cls(config["params"])
        tool.n_users, tool.n_items = int(config["n_users"]), int(config["n_items"])
        tool.train_info = dict(config.get("train_info", {}))
        tool.feat = CTRFeaturizer.from_state(config["features"], arrays)
        bst = xgb.Booster()
        bst.load_model(bytearray(np.asarray(arrays["booster_ubj"], np.uint8).tobytes()))
        tool.booster = bst
        return tool
