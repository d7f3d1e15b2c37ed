"""Names shared by the core and the NVFlare adapters (keys that cross the wire are defined once, here)."""

# ChestX-ray14 finding order, as in NIH's Data_Entry_2017.csv and most published models.
CXR14_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"

# Keys in FLModel.meta / metrics sent between clients and server.
META_NUM_SAMPLES = "num_samples"
META_SITE = "site"
META_TRAIN_LOSS = "train_loss"
META_VAL_LOSS = "val_loss"
META_VAL_MEAN_AUROC = "val_mean_auroc"
META_VAL_AUROC_PREFIX = "val_auroc/"
META_VAL_PREFIX = "val_"  # + a task metric name: val_accuracy, val_macro_f1, val_mean_auroc, val_auroc/<class>
META_EPOCHS = "epochs"
META_ERROR = "error"
META_REFUSED = "refused"  # a site declined the round (e.g. privacy budget); the value says why
META_UNAVAILABLE = "unavailable"  # a site cannot take part in this job (its set-up failed); the value says why
META_EPSILON = "dp_epsilon"  # cumulative epsilon after this round, from the site's accountant
META_DELTA = "dp_delta"
META_EPSILON_BUDGET = "dp_epsilon_budget"
META_NOISE_MULTIPLIER = "dp_noise_multiplier"
META_ENCRYPTED = "he_encrypted"  # the CKKS-encrypted layers (fedmed.security.ckks.EncryptedLayers.to_wire())
META_HE_SECONDS = "he_seconds"  # time a site spent encrypting its update
META_UPDATE_CLIP_NORM = "user_dp_clip_norm"  # set by fedmed.flare.filters.UpdateNoiseFilter
META_UPDATE_NOISE_MULTIPLIER = "user_dp_noise_multiplier"
META_SIGNATURE = "fedmed_signature"  # a site's ML-DSA-65 + Ed25519 signature of its update (fedmed.security.signing)
META_GLOBAL_SIGNATURE = "fedmed_global_signature"  # the server's signature of the global model it sends
# The audit chain's head after the previous round, signed by the server; each hospital keeps it (fedmed.store.receipts).
META_AUDIT_RECEIPT = "fedmed_audit_receipt"
# On the global model of a job that resumes a run (fedmed.server.resume): the NVFlare job ids that ran the run before it.
# A site's DP-SGD accountant counts what those jobs charged to its ledger toward this job's ceiling.
META_RESUMED_JOBS = "fedmed_resumed_jobs"
META_DATA_SYNTHETIC = "data_synthetic"  # the site trained on synthetic (generated) data: True/False, absent = unknown
META_CONTROL = "scaffold_control"  # SCAFFOLD: the server's control variate, sent with the global model
META_CONTROL_DELTA = (
    "scaffold_control_delta"  # SCAFFOLD: the site's control-variate change (fedmed.learning.algorithms)
)
META_LIFETIME_EPSILON = "dp_lifetime_epsilon"  # the site's dataset's epsilon across all jobs, from its privacy ledger
# In a site's signed update (fedmed.server.anchors): its privacy ledger's head (fedmed.privacy.ledger.LedgerHead.to_wire:
# entry count, newest line's sha256, lifetime epsilon, and the line at the count the record held before), and the
# audit receipt it last saw (META_AUDIT_RECEIPT's value, from this job or its receipt log), for the server to check.
META_LEDGER_HEAD = "fedmed_ledger_head"
META_RECEIPT_SEEN = "fedmed_receipt_seen"
# On the global model: {site: the ledger entry count the record holds for it}, so each site's head report says
# what its ledger's line at that count is now (whether the ledger still extends what the federation saw).
META_LEDGER_SEEN = "fedmed_ledger_seen"

# FLContext property (site side, one task): the global model in clear that the site trained from, for the
# site's own result filters (UpdateNoiseFilter measures the update against it).
CTX_GLOBAL_PARAMS = "fedmed.global_params"
# FLContext property (site side, one task): (keys, job id, round, site) the executor signed the update with, so a
# result filter that changes the update (UpdateNoiseFilter) signs what it releases.
CTX_SIGNER = "fedmed.signer"
# FLContext property (site side, one task): {"binding": fedmed.privacy.ledger.LedgerBinding, "round": int}, with
# which the site's UpdateNoiseFilter charges its round to the site's lifetime privacy ledger.
CTX_PRIVACY_LEDGER = "fedmed.privacy_ledger"

# FLContext property (server side, sticky): the fedmed.flare.crosssite_eval.CrossSiteRequest the training workflow
# hands to the cross-site evaluation workflow after it.
CTX_CROSS_SITE = "fedmed.cross_site"

# Server events beside NVFlare's AppEventType ones (ROUND_STARTED, BEFORE/AFTER_AGGREGATION, ROUND_DONE): the round's
# database writes, for listeners such as the benchmarks' fedmed.flare.probes.RoundProbes.
EVENT_BEFORE_RECORD = "fedmed.before_record_round"
EVENT_AFTER_RECORD = "fedmed.after_record_round"

# Task a site answers after the last round: receive the final global model (decrypted there when HE is on) and keep it.
TASK_FINAL_MODEL = "fedmed_final_model"

# The round the server signs a model for cross-site evaluation under (and a site verifies it under, for that task only):
# no training round has it, so a model signed for evaluation (e.g. a hospital's lent local model) never verifies as a
# round's global model.
CROSS_SITE_ROUND = -1

# Columns of a site label CSV (plus one 0/1 column per finding).
COL_SOP_UID = "SOPInstanceUID"
COL_STUDY_UID = "StudyInstanceUID"
COL_SPLIT = "split"
COL_PATH = "path"

# Key, inside a scope's "properties" in a site's NVFlare local/privacy.json, holding a fedmed privacy policy
# (same form as fedmed_site.json's "privacy"): jobs submitted with that scope train under it.
SCOPE_PRIVACY_KEY = "fedmed_privacy"

ENV_DB_URL = "FEDMED_DB_URL"
ENV_SITE_CONFIG = "FEDMED_SITE_CONFIG"
