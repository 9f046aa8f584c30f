from mcl_lightning.bench.cli import main

main()
