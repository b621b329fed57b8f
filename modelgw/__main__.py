from modelgw.cli import main

main()
