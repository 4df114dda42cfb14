from melo_fast.cli import main

main()
