from vmikit.cli import main

main()
