"""Plant master data: the plant file, its validation, and its upsert into the ISA-95 tables.

A plant file (YAML or JSON, see ``mes/samples/plant.yaml``) describes one plant: the equipment
hierarchy with the controller endpoint of each work unit, material classes, material
definitions, stock lots, process segments, work masters (recipes with parameters, the work
units that run them and the test specifications on what they measure) and routings
(operations definitions) made of ordered steps with their material specifications.

The flow is ``read_plant_file`` → ``parse_plant`` (schema and cross-references, no
database) → ``load_plant`` (upsert by ISA-95 id). Every problem found is reported as a
``MasterDataError`` whose message names the entry, e.g.
``work_masters[1] (WM-BAKE-LOAF).parameters[0] (OvenTemp): default 300 is outside [180, 250]``.

One module per job, each importing only those listed before it:

- ``schema``: the pydantic models of the plant file (``Plant`` and its entries).
- ``checks``: cross-checks that refuse bad data with the entry and reason (``MasterDataError``).
- ``reading``: YAML, JSON and B2MML files (or parsed data) into the schema, checked.
- ``loading``: the idempotent, audited upsert into the database; what a partial load keeps.
- ``views``: the read views the API serves (products, the equipment tree).

This package re-exports the names other modules use.
"""

from mes.masterdata.checks import MasterDataError
from mes.masterdata.loading import LoadReport, load_plant, load_plant_file
from mes.masterdata.reading import parse_plant, read_master_data_file, read_plant_file
from mes.masterdata.schema import Plant
from mes.masterdata.views import equipment_tree, list_products

__all__ = [
    "LoadReport",
    "MasterDataError",
    "Plant",
    "equipment_tree",
    "list_products",
    "load_plant",
    "load_plant_file",
    "parse_plant",
    "read_master_data_file",
    "read_plant_file",
]
