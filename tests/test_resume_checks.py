"""What a start from a checkpoint checks before anything is computed (issue 29, items 6 and 7): nothing to train
is one line and exit code 2 (auto-resume of a finished run in its own folder keeps its exit code 0), --start_epoch
beside a checkpoint that is continued is said to be unused, --resume FILE into a new folder gets auto-resume's recipe
checks, and a resume after the training images changed says so (inside an epoch: that epoch restarts)."""
import json
import shutil

import pytest
import torch

import main_finetune
import main_pretrain
import util.checkpoints.checkpoint as ckpt_io
import util.training.process as process
import util.checkpoints.resume as resume
from conftest import TINY, run_in_process, run_script, run_with_fault
from conftest import resume_argv as pretrain_args
from util.checkpoints.saver import data_identity
from util.errors import RunComplete, UsageError
from util.data.image_sources import pretrain_dataset

PRETRAIN = ['--model', 'mae_vit_tiny_patch4', '--epochs', '3']


def parse(module, *argv):
    return module.get_args_parser().parse_args([str(a) for a in argv])


def save_run(path, module, *argv, epoch, script='main_pretrain.py', **extra):
    """A checkpoint as a run of ``module`` with ``argv`` writes it after ``epoch`` (a continued run loads its
    optimizer and epoch)."""
    args = parse(module, *argv)
    args.lr = args.blr * args.batch_size * args.accum_iter / 256 if args.lr is None else args.lr
    torch.save({'model': {}, 'optimizer': {}, 'epoch': epoch, 'script': script, 'args': ckpt_io.args_to_dict(args),
                **extra}, path)
    return path


# ---------------------------------------------------------------------------------------------------- item 6
def test_a_fresh_start_at_or_after_epochs_is_nothing_to_train(tmp_path):
    args = parse(main_pretrain, *PRETRAIN, '--start_epoch', '3', '--output_dir', tmp_path / 'new')
    with pytest.raises(UsageError) as e:
        resume.choose_checkpoint(args, 'main_pretrain.py')
    assert str(e.value) == ("--start_epoch 3 with --epochs 3: nothing to train (epochs are counted from 0; "
                            "--start_epoch must be below --epochs)")
    args = parse(main_pretrain, *PRETRAIN, '--start_epoch', '2', '--output_dir', tmp_path / 'new')
    assert resume.choose_checkpoint(args, 'main_pretrain.py') == ('', None)  # one epoch left: trained


def test_resume_of_a_finished_run_into_a_new_folder_is_nothing_to_train(tmp_path):
    done = save_run(tmp_path / 'done.pth', main_pretrain, *PRETRAIN, epoch=2)
    args = parse(main_pretrain, *PRETRAIN, '--resume', done, '--output_dir', tmp_path / 'new')
    with pytest.raises(UsageError) as e:
        resume.choose_checkpoint(args, 'main_pretrain.py')
    assert str(e.value) == (f"--resume {done} has finished epoch 2 of --epochs 3: nothing to train (raise --epochs "
                            f"to train longer)")
    # the same checkpoint as the newest of its own folder: auto-resume's finished run, exit code 0, as before
    own = tmp_path / 'own'
    own.mkdir()
    save_run(own / 'checkpoint-last.pth', main_pretrain, *PRETRAIN, epoch=2)
    for extra in ([], ['--resume', own / 'checkpoint-last.pth']):
        with pytest.raises(RunComplete, match='holds this run, complete: it finished epoch 2 of --epochs 3'):
            resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, '--output_dir', own, *extra), 'main_pretrain.py')


def test_start_epoch_beside_a_continued_checkpoint_is_said_to_be_unused(tmp_path, capsys):
    ckpt = save_run(tmp_path / 'ck.pth', main_pretrain, *PRETRAIN, epoch=0)
    args = parse(main_pretrain, *PRETRAIN, '--resume', ckpt, '--start_epoch', '2', '--output_dir', tmp_path / 'new')
    assert resume.choose_checkpoint(args, 'main_pretrain.py')[1]['epoch'] == 0
    assert (f"Note: --start_epoch 2 is not used: {ckpt} continues at epoch 1, where it stopped (its optimizer and "
            f"schedule are there)") in capsys.readouterr().out
    # the checkpoint's own next epoch, or the default, say nothing; weights only: --start_epoch is used
    for start in ('0', '1'):
        resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, '--resume', ckpt, '--start_epoch', start,
                                       '--output_dir', tmp_path / 'new'), 'main_pretrain.py')
    weights = tmp_path / 'weights.pth'
    torch.save({'model': {}}, weights)
    resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, '--resume', weights, '--start_epoch', '2',
                                   '--output_dir', tmp_path / 'new'), 'main_pretrain.py')
    assert 'not used' not in capsys.readouterr().out
    with pytest.raises(UsageError, match='--start_epoch 3 with --epochs 3: nothing to train'):
        resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, '--resume', weights, '--start_epoch', '3',
                                       '--output_dir', tmp_path / 'new'), 'main_pretrain.py')


@pytest.mark.parametrize('extra, changed', [
    (['--mask_ratio', '0.6'], '--mask_ratio 0.75 there, 0.6 here'),
    (['--norm_pix_loss'], '--norm_pix_loss False there, True here'),
])
def test_resume_into_a_new_folder_gets_the_recipe_checks_of_auto_resume(tmp_path, extra, changed):
    ckpt = save_run(tmp_path / 'ck.pth', main_pretrain, *PRETRAIN, epoch=0)
    new = tmp_path / 'new'
    with pytest.raises(UsageError) as e:
        resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, *extra, '--resume', ckpt, '--output_dir', new),
                                 'main_pretrain.py')
    assert str(e.value) == (f"--resume {ckpt} is a run with other training flags ({changed}): give it its own flags "
                            f"to continue it, or pass it as --init_from to start a new run from its weights")
    # what a continued run may change (a longer run, another batch size, where the data are read from) is allowed
    assert resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, '--epochs', '9', '--batch_size', '8',
                                          '--data_path', tmp_path, '--resume', ckpt, '--output_dir', new),
                                    'main_pretrain.py')[0] == str(ckpt)
    # --resume further along than the folder's newest checkpoint is checked the same way
    own = tmp_path / 'own'
    own.mkdir()
    save_run(own / 'checkpoint-0.pth', main_pretrain, *PRETRAIN, *extra, epoch=0)
    further = save_run(tmp_path / 'further.pth', main_pretrain, *PRETRAIN, epoch=1)
    with pytest.raises(UsageError, match=f'is a run with other training flags \\({changed}\\)'):
        resume.choose_checkpoint(parse(main_pretrain, *PRETRAIN, *extra, '--resume', further, '--output_dir', own),
                                 'main_pretrain.py')


def test_resume_of_another_scripts_run_is_refused(tmp_path):
    ckpt = save_run(tmp_path / 'pre.pth', main_pretrain, *PRETRAIN, epoch=0)
    args = parse(main_finetune, '--model', 'vit_tiny_patch4', '--resume', ckpt, '--output_dir', tmp_path / 'ft')
    with pytest.raises(UsageError) as e:
        resume.choose_checkpoint(args, 'main_finetune.py')
    assert str(e.value) == (f"--resume {ckpt} is a run of main_pretrain.py --model mae_vit_tiny_patch4 (the end of "
                            f"epoch 0), not of main_finetune.py --model vit_tiny_patch4: pass it as --finetune to start "
                            f"a new run from its weights")
    # evaluating it is no training: not checked here
    args = parse(main_finetune, '--model', 'vit_tiny_patch4', '--resume', ckpt, '--eval')
    assert resume.choose_checkpoint(args, 'main_finetune.py')[0] == str(ckpt)


@pytest.mark.slow
def test_nothing_to_train_is_one_line_before_anything_runs(tmp_path, capsys):
    base = ['--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--batch_size', '4', '--data_path', TINY,
            '--device', 'cpu', '--num_workers', '0']
    first = tmp_path / 'first'
    process.run_main(main_pretrain.main, main_pretrain.get_args_parser(),  # (returns when the run succeeds)
                    [str(a) for a in [*base, '--epochs', '1', '--output_dir', first]])
    for extra in (['--start_epoch', '5', '--epochs', '3'], ['--resume', first / 'checkpoint-0.pth', '--epochs', '1']):
        new = tmp_path / 'new'
        code, err = run_in_process(main_pretrain, capsys, *base, *extra, '--output_dir', new)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and 'nothing to train' in lines[0], err
        assert not list(new.glob('*.pth')) and not (new / 'log.txt').exists()
    # a finished run in its own folder: one line, exit code 0 (run_main returns), as before
    capsys.readouterr()
    process.run_main(main_pretrain.main, main_pretrain.get_args_parser(),
                    [str(a) for a in [*base, '--epochs', '1', '--output_dir', first]])
    assert 'holds this run, complete' in capsys.readouterr().out
    assert len((first / 'log.txt').read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- item 7
def copy_tiny(folder):
    shutil.copytree(TINY, folder)
    return folder


def test_data_identity_is_the_file_list_wherever_it_lies(tmp_path):
    a = pretrain_dataset(str(copy_tiny(tmp_path / 'a')))
    b = pretrain_dataset(str(copy_tiny(tmp_path / 'elsewhere' / 'b')))
    assert data_identity(a) == data_identity(b) and data_identity(a)['data_size'] == 16
    extra = tmp_path / 'elsewhere' / 'b' / 'train' / 'airplane' / 'extra.jpg'
    shutil.copy(extra.parent / '0000.jpg', extra)
    c = pretrain_dataset(str(tmp_path / 'elsewhere' / 'b'))
    assert data_identity(c)['data_size'] == 17 and data_identity(c)['data_fingerprint'] != \
        data_identity(a)['data_fingerprint']
    extra.rename(extra.parent / '0000x.jpg')
    d = pretrain_dataset(str(tmp_path / 'elsewhere' / 'b'))
    assert data_identity(d)['data_size'] == 17 and data_identity(d) != data_identity(c)
    assert resume.data_change(data_identity(c), d) == ('the training data changed since it was saved (17 images, '
                                                       'other files)')
    assert resume.data_change(data_identity(a), d) == ('the training data changed since it was saved (16 images '
                                                       'then, 17 now)')
    assert resume.data_change({}, d) == ''  # a checkpoint from before: nothing to compare
    assert resume.data_change(data_identity(a), b) == ''


@pytest.mark.slow
def test_resume_after_the_images_changed_says_so(tmp_path):
    data = copy_tiny(tmp_path / 'data')
    out = tmp_path / 'run'
    argv = pretrain_args(out, '--save_every_iters', '1', '--data_path', data)
    stopped = run_with_fault('stop:3', argv)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)  # (the new keys load with weights_only)
    assert ckpt['resume_iter'] == 3 and ckpt['data_size'] == 16 and len(ckpt['data_fingerprint']) == 16
    for k in range(4):  # images added mid-epoch
        shutil.copy(data / 'train' / 'airplane' / '0000.jpg', data / 'train' / 'airplane' / f'added{k}.jpg')
    resumed = run_script(*argv)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ('Note: the training data changed since it was saved (16 images then, 20 now); restarting epoch 0 from '
            'its beginning with fresh random streams') in resumed.stdout
    assert 'Resuming epoch 0 at iteration' not in resumed.stdout
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0, 1, 2]
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['data_size'] == 20
    # at an epoch boundary: continued, with one line
    (data / 'train' / 'airplane' / 'added0.jpg').unlink()
    longer = run_script(*pretrain_args(out, '--data_path', data, '--epochs', '4'))
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert ('Note: the training data changed since it was saved (20 images then, 19 now); epoch 3 and the later ones '
            'draw from it as it is now') in longer.stdout
