from mcl_lightning.tools.bench.cli import main

main()
