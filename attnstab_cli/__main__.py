from attnstab_cli.cli.app import main

main()
