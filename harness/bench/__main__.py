from .suites import main

main()
