"""Write the JSON Schema of every bus message into proto/schemas/.

python -m proto          # (make proto) regenerate the committed files
"""

from proto.schema import write_schemas

if __name__ == "__main__":
    for path in write_schemas():
        print(f"wrote {path}")
