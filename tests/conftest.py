import sys
from pathlib import Path

# the tests import model, common, ... from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# a skipped test hides something missing: make it fail the run instead
def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter is not None and reporter.stats.get('skipped') and session.exitstatus == 0:
        reporter.write_line('FAILED: tests were skipped; install what they need instead (see .ci/run)', red=True)
        session.exitstatus = 1
