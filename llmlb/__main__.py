from llmlb.cli import main

main()
