"""fedmed's command lines. Each module's main(argv) is a console command (pyproject.toml [project.scripts]) and is
what scripts/<module>.py runs:

    fedmed-generate-hospitals   synthetic DICOM hospitals             (generate_hospitals)
    fedmed-federation           a provisioned federation on 127.0.0.1 (federation)
    fedmed-install-kit          site_configs/ into a startup kit      (install_kit)
    fedmed-submit               submit the job as an FL admin         (submit_job)
    fedmed-rounds               the per-round table from the database (rounds_table)
    fedmed-report               HTML/PNG report of a run              (report)
    fedmed-audit-verify         check the audit hash chain            (audit_verify)
    fedmed-infer                clinician inference on DICOM studies  (infer)
    fedmed-choose-thresholds    decision thresholds into a model file (choose_thresholds)
    fedmed-export-bundle        a MONAI bundle of a model file        (export_bundle)
    fedmed-pretrain-public      a starting model from public data     (pretrain_public)
    fedmed-site                 check or stop one installed site kit  (site)
    fedmed-signing-keys         the federation's update-signing keys  (signing_keys)
    fedmed-redteam              the attack suite against the defences (redteam)
    fedmed-he-keys              the CKKS key custodian's contexts     (he_keys)
    fedmed-privacy-ledger       a hospital's lifetime privacy ledger  (privacy_ledger)

`python -m fedmed.cli.<module>` runs the same.
"""
