from lopd.cli import main

main()
