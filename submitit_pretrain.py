"""Submit MAE pre-training to SLURM with submitit, as the reference's ``submitit_pretrain.py``:

    python submitit_pretrain.py --nodes 2 --ngpus 8 --use_volta32 --job_dir <shared folder>/%j [main_pretrain.py flags]

(util/slurm/submitit_job.py submits; the job saves and requeues itself before the time limit:
util/slurm/submitit_trainer.py)
"""
import util.slurm.submitit_job as submitit_job

parse_args, main = submitit_job.entry_points('main_pretrain', "Submitit for MAE pretrain")

if __name__ == "__main__":
    main()
