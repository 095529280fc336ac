from .leanimport import skip_pyroute2_init

skip_pyroute2_init()

from .cli import main  # noqa: E402

main()
