"""The reproduction harness: claims, their runner, the results store, the report, the benchmarks and
the ``gradkit`` command. It imports the library; nothing in the library imports it."""
