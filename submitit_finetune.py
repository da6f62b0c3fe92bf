"""Submit MAE fine-tuning to SLURM with submitit, as the reference's ``submitit_finetune.py``:

    python submitit_finetune.py --nodes 2 --ngpus 8 --use_volta32 --job_dir <shared folder>/%j [main_finetune.py flags]

(util/slurm/submitit_job.py submits; the job saves and requeues itself before the time limit:
util/slurm/submitit_trainer.py)
"""
import util.slurm.submitit_job as submitit_job

parse_args, main = submitit_job.entry_points('main_finetune', "Submitit for MAE finetune")

if __name__ == "__main__":
    main()
