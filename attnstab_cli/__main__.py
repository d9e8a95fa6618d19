from attnstab_cli.cli.entry import main

main()
