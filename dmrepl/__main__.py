from dmrepl.cli.app import main

main()
