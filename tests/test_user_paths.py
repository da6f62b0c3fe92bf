"""Paths a user names, tried as a hostile user would (issue 29's hunt): missing, empty, damaged, of the wrong kind,
unwritable, or aliasing another path. Each is one line naming the path, or a note where the run goes on."""
import export


def test_the_model_card_shows_only_the_readable_rows_of_a_damaged_log(tmp_path):
    (tmp_path / 'log.txt').write_bytes(b'{"epoch": 0}\n\xff\xfe\n[1]\n{"epoch": 1}\n')
    assert export._log_rows(tmp_path / 'checkpoint-1.pth') == ['{"epoch": 0}', '{"epoch": 1}']
    (tmp_path / 'log.txt').unlink()
    (tmp_path / 'log.txt').mkdir()
    assert export._log_rows(tmp_path / 'checkpoint-1.pth') == []
