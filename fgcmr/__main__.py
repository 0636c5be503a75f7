from fgcmr.cli import main

main()
