"""Submit MAE linear probing to SLURM with submitit, as the reference's ``submitit_linprobe.py``:

    python submitit_linprobe.py --nodes 2 --ngpus 8 --use_volta32 --job_dir <shared folder>/%j [main_linprobe.py flags]

The job saves and requeues itself on SLURM's warning before the time limit or on preemption, and the requeued job
continues from its last checkpoint (see util/submitit_job.py). Needs submitit (``pip install submitit``).
"""
import util.submitit_job as submitit_job

TRAINER = 'main_linprobe'
DESCRIPTION = "Submitit for MAE linear probe"


def parse_args(argv=None):
    return submitit_job.parse_args(TRAINER, DESCRIPTION, argv)


def main(argv=None):
    submitit_job.main(TRAINER, DESCRIPTION, argv)


if __name__ == "__main__":
    main()
